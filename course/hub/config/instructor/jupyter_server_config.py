"""Jupyter server settings for instructors on the course hub.

The formgrader is a page of this server shown inside JupyterLab in an iframe; the server's
default ``frame-ancestors 'none'`` leaves that frame blank, so instructors' servers allow
their own origin.  (Students' servers keep the default.)
"""
c = get_config()  # noqa: F821
c.ServerApp.tornado_settings = {"headers": {"Content-Security-Policy": "frame-ancestors 'self'"}}
