"""Widgets for the labs (ipywidgets + matplotlib); each submodule is imported on demand."""
