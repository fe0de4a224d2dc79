"""Authentication: dev mode, and refusing to run without any."""

from __future__ import annotations

import logging

import pytest
from starlette.requests import HTTPConnection

from tidings.auth import ConfigError, DevAuthenticator, Principal, build_authenticator
from tidings.config import Settings


def connection() -> HTTPConnection:
    return HTTPConnection(
        {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "scheme": "ws"}
    )


def test_dev_authenticator_lets_anyone_identify_as_anyone() -> None:
    principal = DevAuthenticator().authenticate(connection())
    assert principal == Principal(email=None)
    assert principal.may_identify("alice@example.com")
    assert principal.may_identify("bob@example.com")


def test_a_principal_with_an_email_may_only_be_that_email() -> None:
    principal = Principal(email="alice@example.com")
    assert principal.may_identify("alice@example.com")
    assert not principal.may_identify("bob@example.com")
    assert not principal.may_identify("ALICE@example.com")  # callers pass normalised e-mails


def test_build_authenticator_in_dev_mode_warns(caplog: pytest.LogCaptureFixture) -> None:
    authenticator = build_authenticator(Settings(dev=True))
    assert isinstance(authenticator, DevAuthenticator)
    warnings = [r for r in caplog.records if r.getMessage() == "dev_mode"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "no authentication" in warnings[0].__dict__["detail"]


def test_build_authenticator_refuses_without_dev() -> None:
    with pytest.raises(ConfigError) as info:
        build_authenticator(Settings(dev=False))
    message = str(info.value)
    assert "no authentication is configured" in message
    assert "TIDINGS_DEV=1" in message
    assert "--dev" in message
