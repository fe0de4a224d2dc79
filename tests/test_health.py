"""Health probes against the real app with its lifespan running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from tests.fakes import FakeFeed, FlakyStore, until
from tidings.app import create_app
from tidings.config import Settings
from tidings.services import Services


def build(settings: Settings) -> Starlette:
    return create_app(settings.model_copy(update={"ready_timeout": 0.05}))


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """The app with its lifespan running."""
    app = build(settings)
    async with app.router.lifespan_context(app):
        await until(lambda: services(app).feed.running)  # the feed task has started
        yield app


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tidings.test") as client:
        yield client


def services(app: Starlette) -> Services:
    found: Services = app.state.services
    return found


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


async def test_readyz_is_ready_with_the_lifespan_running(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    assert services(app).feed.running
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_while_draining(client: httpx.AsyncClient, app: Starlette) -> None:
    services(app).draining = True
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "unready"
    assert "draining" in response.json()["reason"]
    assert (await client.get("/healthz")).status_code == 200  # alive, just not ready


async def test_readyz_when_the_feed_is_not_running(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    services(app).feed = FakeFeed(running=False)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unready", "reason": "change feed is not running"}


async def test_readyz_when_the_database_fails(client: httpx.AsyncClient, app: Starlette) -> None:
    store = FlakyStore(services(app).store)
    store.fail.add("ping")
    services(app).store = store
    response = await client.get("/readyz")
    assert response.status_code == 503
    reason = response.json()["reason"]
    assert reason.startswith("database is not answering")
    assert "database error" in reason
    store.fail.clear()
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_when_the_database_hangs(client: httpx.AsyncClient, app: Starlette) -> None:
    store = FlakyStore(services(app).store)

    async def hang() -> None:
        await asyncio.Event().wait()

    store.before["ping"] = hang
    services(app).store = store
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"].startswith("database is not answering")


async def test_readyz_says_when_the_database_timed_out(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    store = FlakyStore(services(app).store)

    async def hang() -> None:
        await asyncio.Event().wait()

    store.before["ping"] = hang
    services(app).store = store
    assert "timed out" in (await client.get("/readyz")).json()["reason"]


async def test_readyz_turns_unready_when_the_lifespan_ends(settings: Settings) -> None:
    app = build(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tidings.test") as client:
        async with app.router.lifespan_context(app):
            await until(lambda: services(app).feed.running)
            assert (await client.get("/readyz")).status_code == 200
        assert services(app).draining is True
        assert services(app).feed.running is False
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "draining" in response.json()["reason"]
