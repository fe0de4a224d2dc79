"""Tidings: real-time messaging over WebSockets, stored in MongoDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.app import create_app
    from tidings.config import Settings

__all__ = ["Settings", "create_app"]
# Declared, not assigned: ``__getattr__`` reads it from the installed metadata,
# so pyproject.toml is the one place the version is written.
__version__: str


def __getattr__(name: str) -> Any:
    # Imported on first use: ``tidings.client`` and the terminal commands need
    # neither the server nor its database driver (0.8 s of imports).
    if name == "__version__":
        from importlib import metadata

        return metadata.version("tidings")
    if name == "create_app":
        from tidings.app import create_app

        return create_app
    if name == "Settings":
        from tidings.config import Settings

        return Settings
    raise AttributeError(f"module 'tidings' has no attribute {name!r}")
