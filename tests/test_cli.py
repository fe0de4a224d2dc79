"""The ``tidings`` command, without ever starting a blocking server."""

from __future__ import annotations

import gc
import os
import signal

import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from tidings.auth import JWTAuthenticator
from tidings.cli import main
from tidings.config import Settings
from tidings.server import EXIT_DEADLINE, GC_THRESHOLD, DrainingServer, server_config, tune_gc

SECRET = "k" * 40

pytestmark = pytest.mark.usefixtures("restore_logging")


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


def test_server_config_honours_websocket_compression(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_WEBSOCKET_COMPRESSION", "1")
    monkeypatch.setenv("TIDINGS_MAX_FRAME_BYTES", "1234")
    config = server_config(nothing, Settings(dev=True))
    assert config.ws_per_message_deflate is True
    assert config.ws_max_size == 1234


def test_server_config_leaves_compression_off_by_default() -> None:
    config = server_config(nothing, Settings(dev=True, max_frame_bytes=999))
    assert config.ws_per_message_deflate is False
    assert config.ws_max_size == 999


# --- tidings serve refuses unsafe settings before a server starts ------------------------


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[uvicorn.Server]:
    """Make starting uvicorn fail loudly instead of blocking the test run."""
    started: list[uvicorn.Server] = []

    def run(self: uvicorn.Server, sockets: object = None) -> None:
        started.append(self)
        raise AssertionError("uvicorn must not start")

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return started


def test_serve_with_a_short_secret_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_server: list[uvicorn.Server],
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "too-short")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "tidings: refusing to start:" in err
    assert "32 bytes" in err
    assert "too-short" not in err
    assert no_server == []


def test_serve_with_a_short_secret_refuses_even_with_dev(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_server: list[uvicorn.Server],
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "s" * 31)
    assert main(["serve", "--dev"]) == 2
    assert "32 bytes" in capsys.readouterr().err
    assert no_server == []


def test_serve_with_an_unreadable_key_file_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_server: list[uvicorn.Server],
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_PUBLIC_KEY_FILE", "/nonexistent/tidings/key.pem")
    assert main(["serve"]) == 2
    assert "cannot load the JWT verification keys" in capsys.readouterr().err
    assert no_server == []


def test_serve_runs_uvicorn_with_the_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[uvicorn.Config] = []

    def run(self: uvicorn.Server, sockets: object = None) -> None:
        started.append(self.config)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("TIDINGS_WEBSOCKET_COMPRESSION", "true")
    assert main(["serve", "--dev", "--host", "10.1.2.3", "--port", "9123"]) == 0
    (config,) = started
    assert (config.host, config.port) == ("10.1.2.3", 9123)
    assert config.ws_per_message_deflate is True
    assert config.access_log is False


# --- tidings token -----------------------------------------------------------------------


def minted(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_token_mints_a_token_the_server_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    assert main(["token", "--email", "Bob@Example.com"]) == 0
    token = minted(capsys)
    claims = JWTAuthenticator(SECRET, {}, None, None).verify(token)
    assert claims["email"] == "bob@example.com"
    assert claims["sub"] == "bob@example.com"
    assert claims["exp"] - claims["iat"] == 3600
    assert "iss" not in claims
    assert "aud" not in claims
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_token_includes_the_configured_issuer_and_audience(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    monkeypatch.setenv("TIDINGS_JWT_ISSUER", "https://issuer.example")
    monkeypatch.setenv("TIDINGS_JWT_AUDIENCE", "tidings")
    assert main(["token", "--email", "Bob@Example.com"]) == 0
    token = minted(capsys)
    claims = JWTAuthenticator(SECRET, {}, "https://issuer.example", "tidings").verify(token)
    assert (claims["iss"], claims["aud"]) == ("https://issuer.example", "tidings")
    assert claims["email"] == "bob@example.com"


def test_token_ttl_sets_the_expiry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    assert main(["token", "--email", "a@b.io", "--ttl", "90"]) == 0
    claims = JWTAuthenticator(SECRET, {}, None, None).verify(minted(capsys))
    assert claims["exp"] - claims["iat"] == 90


def test_token_is_not_accepted_with_another_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    assert main(["token", "--email", "a@b.io"]) == 0
    token = minted(capsys)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "x" * 40, algorithms=["HS256"])


def test_token_without_a_secret_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--email", "bob@example.com"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "set TIDINGS_JWT_SECRET" in captured.err


@pytest.mark.parametrize("email", ["not-an-email", "", "a b@example.com"])
def test_token_with_an_invalid_email_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], email: str
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    assert main(["token", "--email", email]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--email" in captured.err
    assert "e-mail address" in captured.err


def test_token_needs_an_email(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token"])
    assert info.value.code == 2
    assert "--email" in capsys.readouterr().err


def test_token_with_a_short_secret_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "short")
    assert main(["token", "--email", "a@b.io"]) == 2
    assert "32 bytes" in capsys.readouterr().err


# --- the drain's deadline and second signal ----------------------------------------------


def test_the_drain_deadline_ends_the_process_with_its_own_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the real one would end the test run
    server = DrainingServer(server_config(nothing, Settings(dev=True)), Starlette(), 25.0)
    server._give_up()
    assert exits == [EXIT_DEADLINE]


def test_a_signal_before_the_server_started_is_uvicorns_own() -> None:
    server = DrainingServer(server_config(nothing, Settings(dev=True)), Starlette(), 25.0)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    assert not server.force_exit


def test_tune_gc_freezes_what_start_up_made_and_raises_the_threshold() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD
        assert gc.get_threshold()[0] > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        # The test process keeps collecting as it did.
        gc.unfreeze()
        gc.set_threshold(*before)
