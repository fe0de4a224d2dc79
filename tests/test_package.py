"""The ``tidings`` package: what it exports, and what importing the client costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tidings
from tidings.app import create_app
from tidings.config import Settings


def test_the_package_exports_create_app_and_settings() -> None:
    assert tidings.create_app is create_app
    assert tidings.Settings is Settings
    with pytest.raises(AttributeError, match="no attribute 'serve'"):
        _ = tidings.serve


def test_the_client_imports_neither_the_server_nor_the_database_driver() -> None:
    probe = (
        "import sys, tidings.client; "
        "print(sorted(m for m in ('tidings.app', 'pymongo', 'uvicorn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
