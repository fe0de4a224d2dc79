"""Health probes: ``/healthz`` and ``/readyz`` over HTTP, on Services built from the memory engine.

The app here is just the two routes with ``app.state.services`` set, so that
each test says what state the feed, the database and the drain are in. One
test runs the real app's lifespan end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from tests.fakes import FlakyStore, until
from tidings.app import create_app
from tidings.auth import DevAuthenticator
from tidings.config import Settings
from tidings.engine.memory import memory_engine
from tidings.handlers import Handlers
from tidings.health import healthz, readyz
from tidings.hub import Hub
from tidings.recorder import Recorder
from tidings.services import Services


def build_services(ready_timeout: float = 0.05) -> tuple[Services, FlakyStore]:
    """Services on a memory engine whose store is a ``FlakyStore``; that store."""
    engine = memory_engine()
    store = FlakyStore(engine.store)
    engine = replace(engine, store=store)
    hub = Hub(engine.feed)
    recorder = Recorder(store)
    services = Services(
        settings=Settings(dev=True, ready_timeout=ready_timeout),
        engine=engine,
        hub=hub,
        recorder=recorder,
        handlers=Handlers(store, engine.presence, recorder, 100),
        authenticator=DevAuthenticator(),
    )
    return services, store


def probe_app(services: Services) -> Starlette:
    app = Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])
    app.state.services = services
    return app


@contextlib.asynccontextmanager
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tidings.test") as client:
        yield client


@pytest.fixture
async def services() -> AsyncIterator[tuple[Services, FlakyStore]]:
    """Services with their feed running, and the store behind them."""
    built, store = build_services()
    feed = asyncio.create_task(built.engine.feed.run(built.hub.dispatch))
    await until(lambda: built.engine.feed.running)
    yield built, store
    feed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feed


@pytest.fixture
async def client(services: tuple[Services, FlakyStore]) -> AsyncIterator[httpx.AsyncClient]:
    async with http(probe_app(services[0])) as client:
        yield client


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


async def test_readyz_is_ready_when_the_feed_runs_and_the_database_answers(
    client: httpx.AsyncClient, services: tuple[Services, FlakyStore]
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}
    assert services[1].calls == ["ping"]


async def test_readyz_while_draining(
    client: httpx.AsyncClient, services: tuple[Services, FlakyStore]
) -> None:
    services[0].draining = True
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unready",
        "reason": "draining: the server is shutting down",
    }
    assert (await client.get("/healthz")).status_code == 200  # alive, just not ready


async def test_readyz_when_the_feed_is_not_running() -> None:
    built, store = build_services()  # its feed never started
    async with http(probe_app(built)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unready",
        "reason": "change feed: the in-process feed is not running",
    }
    assert "ping" not in store.calls


async def test_readyz_when_the_database_fails(
    client: httpx.AsyncClient, services: tuple[Services, FlakyStore]
) -> None:
    store = services[1]
    store.fail.add("ping")
    response = await client.get("/readyz")
    assert response.status_code == 503
    reason = response.json()["reason"]
    assert reason.startswith("database is not answering: ")
    assert "database error" in reason
    store.fail.clear()
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_when_the_database_does_not_answer_within_ready_timeout(
    client: httpx.AsyncClient, services: tuple[Services, FlakyStore]
) -> None:
    store = services[1]

    async def never_answers() -> None:
        await asyncio.Event().wait()

    store.before["ping"] = never_answers
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "database is not answering: timed out"


async def test_the_real_app_turns_unready_when_its_lifespan_ends() -> None:
    app = create_app(Settings(dev=True))
    async with http(app) as client:
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            await until(lambda: services.engine.feed.running)
            assert (await client.get("/readyz")).status_code == 200
        assert services.draining is True
        assert services.engine.feed.running is False
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "draining" in response.json()["reason"]
