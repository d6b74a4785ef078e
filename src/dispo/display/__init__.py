"""Showing a session's app to the user: X11 forwarding over SSH, or a web viewer (noVNC) on 127.0.0.1."""
