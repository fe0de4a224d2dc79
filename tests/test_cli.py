"""The ``tidings`` command, without ever starting a blocking server."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from starlette.types import Receive, Scope, Send

from tidings.cli import main, server_config
from tidings.config import Settings

LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures logging before it refuses; put the loggers back afterwards."""
    saved = [
        (logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).level)
        for n in LOGGERS
    ]
    propagate = {n: logging.getLogger(n).propagate for n in LOGGERS}
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
    for name, value in propagate.items():
        logging.getLogger(name).propagate = value


async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that is never called."""


def test_invalid_settings_return_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_PING_INTERVAL", "soon")
    assert main(["serve", "--dev"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidings: invalid settings:")
    assert "ping_interval" in err


def test_an_invalid_port_option_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--dev", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


def test_refuses_to_start_without_dev(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "tidings: refusing to start:" in err
    assert "TIDINGS_DEV=1" in err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_a_non_numeric_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "http"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_server_config_carries_the_settings() -> None:
    settings = Settings(
        dev=True,
        host="10.0.0.7",
        port=9100,
        max_frame_bytes=4096,
        ping_interval=7.5,
        ping_timeout=3.0,
    )
    config = server_config(nothing, settings)
    assert config.app is nothing
    assert (config.host, config.port) == ("10.0.0.7", 9100)
    assert config.ws_max_size == 4096
    assert config.ws_ping_interval == 7.5
    assert config.ws_ping_timeout == 3.0
    assert config.ws_per_message_deflate is False
    assert config.access_log is False
    assert config.log_config is None
    assert config.lifespan == "on"


def test_server_config_defaults_follow_the_specification() -> None:
    config = server_config(nothing, Settings(dev=True))
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.ws_max_size == 65536
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (20.0, 20.0)
