"""Tidings: real-time messaging over WebSockets, stored in MongoDB."""

from tidings.app import create_app
from tidings.config import Settings

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"
