"""The app's own background work: preparing the engine's database, and refreshing presence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

import pytest

from tests.fakes import ALICE, BOB, FakeSubscriber
from tests.helpers import TIMEOUT
from tidings import app as app_module
from tidings.auth import DevAuthenticator
from tidings.config import Settings
from tidings.engine.memory import memory_engine
from tidings.errors import StoreUnavailable
from tidings.handlers import Handlers
from tidings.hub import Hub
from tidings.recorder import Recorder
from tidings.services import Services


class CountingPresence:
    """Presence whose records expire, that counts its refreshes and fails the first."""

    refresh_interval = 0.01

    def __init__(self) -> None:
        self.refreshed: list[list[str]] = []
        self.thrice = asyncio.Event()

    async def is_online(self, email: str) -> bool:
        return False

    async def set(self, email: str, online: bool) -> None:
        pass

    async def refresh(self, emails: Sequence[str]) -> None:
        self.refreshed.append(sorted(emails))
        if len(self.refreshed) == 3:
            self.thrice.set()
        if len(self.refreshed) == 1:
            raise StoreUnavailable("database error: down")


def services_with(presence: CountingPresence | None = None) -> Services:
    engine = memory_engine()
    if presence is not None:
        engine = replace(engine, presence=presence)
    hub = Hub(engine.feed)
    recorder = Recorder(engine.store)
    return Services(
        settings=Settings(dev=True),
        engine=engine,
        hub=hub,
        recorder=recorder,
        handlers=Handlers(engine.store, engine.presence, recorder, 100),
        authenticator=DevAuthenticator(),
    )


async def test_presence_is_refreshed_as_often_as_the_engine_asks_and_survives_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    presence = CountingPresence()
    services = services_with(presence)
    services.hub.attach(BOB, FakeSubscriber("c1"))
    services.hub.attach(ALICE, FakeSubscriber("c2"))
    task = asyncio.create_task(app_module._keep_presence(services, presence.refresh_interval))
    await asyncio.wait_for(presence.thrice.wait(), TIMEOUT)
    services.draining = True
    await asyncio.wait_for(task, TIMEOUT)  # it ends with the drain
    assert presence.refreshed[:3] == [[ALICE, BOB]] * 3
    assert [r.message for r in caplog.records].count("presence_refresh_failed") == 1


def test_the_memory_engine_asks_for_no_refresh() -> None:
    assert memory_engine().presence.refresh_interval is None


async def test_preparing_retries_until_the_database_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app_module, "PREPARE_FIRST_RETRY", 0.001)
    attempts = 0

    async def prepare() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise StoreUnavailable(f"cannot reach the database ({attempts})")

    services = services_with()
    services = replace(services, engine=replace(services.engine, prepare=prepare))
    services.unready = "the database has not answered yet"
    caplog.set_level(logging.INFO, logger="tidings.app")
    await asyncio.wait_for(app_module._prepare(services), TIMEOUT)
    assert attempts == 3
    assert services.unready is None
    events = [(r.message, getattr(r, "retry_in", None)) for r in caplog.records]
    assert events == [
        ("database_unreachable", 0.001),
        ("database_unreachable", 0.002),  # doubled
        ("database_ready", None),
    ]
