"""llmopt: reference implementations for the LLM Optimization Labs.

One module per method (see CONTRIBUTING.md, "Where things go"). Importing the package on a machine
without CUDA sets ``TRITON_INTERPRET=1`` before any Triton kernel is defined, so every
kernel in the course (and every kernel a student writes in a notebook cell after
``import llmopt``) runs, slowly, on the CPU through Triton's interpreter.
"""
import os as _os


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in _os.environ and not _cuda_available():
    _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"
ASSETS = _os.path.join(_os.path.dirname(__file__), "assets")
