"""The ``tidings`` package: what it exports, and what the client side of it loads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata

import pytest

import tidings
from tidings.app import create_app
from tidings.config import Settings

# What a client may load of the package: the library, the command that runs the
# terminal clients, and the modules they share with the server, which import
# nothing of it. An allow-list, so that a new server module is caught too.
CLIENT_MODULES = {"tidings", "tidings.cli", "tidings.emails", "tidings.ids", "tidings.client"}
# Packages only the server needs: the settings, the database driver, the web stack.
SERVER_PACKAGES = {
    "pydantic",
    "pydantic_settings",
    "pymongo",
    "bson",
    "starlette",
    "uvicorn",
    "jwt",
}


def _server_modules(code: str) -> tuple[str, list[str]]:
    """Run ``code`` in a fresh interpreter: what it printed, and every module it
    loaded that only the server needs."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    *printed, modules = done.stdout.splitlines()
    server = [
        name
        for name in json.loads(modules)
        if name.split(".")[0] in SERVER_PACKAGES
        or (
            name.startswith("tidings.")
            and name not in CLIENT_MODULES
            and not name.startswith("tidings.client.")
        )
    ]
    return "\n".join(printed), server


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A WebSocket URL on a port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"


def test_the_package_exports_create_app_and_settings() -> None:
    assert tidings.create_app is create_app
    assert tidings.Settings is Settings
    with pytest.raises(AttributeError, match="no attribute 'serve'"):
        _ = tidings.serve


def test_the_version_is_the_installed_one() -> None:
    assert tidings.__version__ == metadata.version("tidings")


def test_the_client_imports_nothing_of_the_server() -> None:
    assert _server_modules("import tidings.client") == ("", [])


@pytest.mark.parametrize(
    "command",
    [
        ["send", "--email", "alice@example.com", "--to", "bob@example.com", "hi"],
        ["chat", "--email", "alice@example.com"],
    ],
    ids=["send", "chat"],
)
def test_the_terminal_clients_import_nothing_of_the_server(
    command: list[str], refusing_url: str
) -> None:
    # Run to the end: through ``tidings.cli`` and the attempt to connect, which
    # fails (exit status 3) without a server to answer.
    argv = [*command, "--url", refusing_url]
    code = f"from tidings.cli import main\nprint(main({argv!r}))"
    assert _server_modules(code) == ("3", [])
