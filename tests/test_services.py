"""Services: the drain that SIGTERM starts."""

from __future__ import annotations

import logging

import pytest

from tests.fakes import World
from tidings.auth import DevAuthenticator
from tidings.config import Settings
from tidings.errors import CloseCode
from tidings.handlers import Handlers
from tidings.services import Services


async def test_drain_turns_unready_then_closes_every_session_with_1012(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.services")
    services = Services(
        settings=Settings(dev=True, drain_delay=0),
        store=world.store,
        feed=world.feed,
        hub=world.hub,
        handlers=Handlers(world.store, 100),
        authenticator=DevAuthenticator(),
    )
    (one, one_transport), (two, two_transport) = world.session(), world.session()
    services.sessions.update({one, two})
    one.push({"type": "#pong", "ts": "queued"})

    await services.drain()

    assert services.draining is True
    for transport in (one_transport, two_transport):
        assert transport.closes == [(CloseCode.SERVICE_RESTART, "server restarting; reconnect")]
    assert one_transport.sent == ['{"type":"#pong","ts":"queued"}']
    assert any(record.getMessage() == "draining" for record in caplog.records)
