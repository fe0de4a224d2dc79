"""Tidings: real-time messaging over WebSockets, stored in MongoDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.app import create_app
    from tidings.config import Settings

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: ``tidings.client`` and the terminal commands need
    # neither the server nor its database driver (0.8 s of imports).
    if name == "create_app":
        from tidings.app import create_app

        return create_app
    if name == "Settings":
        from tidings.config import Settings

        return Settings
    raise AttributeError(f"module 'tidings' has no attribute {name!r}")
