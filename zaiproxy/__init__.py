"""zaiproxy: a multi-process trio + h11 reverse proxy for Z.AI and compatible APIs."""

__version__ = "0.1.0"
