"""Fixtures shared by the whole suite."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import skips
from tests.fakes import World, running_world
from tests.helpers import serve
from tests.mongo import REAL_MONGODB_URI, NxServer
from tidings.config import Settings


def pytest_configure(config: pytest.Config) -> None:
    """A skip for a reason not allowed in tests/skips.py fails the run."""
    skips.pytest_configure(config)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from what each test says, not from the shell that runs the suite."""
    for name in list(os.environ):
        if name.startswith("TIDINGS_") and not name.startswith("TIDINGS_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that run configure_logging: put the root and uvicorn loggers back."""
    loggers = [
        logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    ]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
async def world() -> AsyncIterator[World]:
    """A store, feed and hub wired as in the app, the feed running; sessions come from it."""
    async with running_world() as running:
        yield running


@pytest.fixture
def settings() -> Settings:
    """Dev-mode settings on the embedded store."""
    return Settings(dev=True)


@pytest.fixture(scope="session")
def nx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NxServer]:
    """One nx-27017 server for the session; each test uses a database of its own."""
    server = NxServer(tmp_path_factory.mktemp("nx"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_nx(tmp_path: Path) -> Iterator[NxServer]:
    """An nx-27017 server of the test's own, free to be killed, frozen or restarted."""
    server = NxServer(tmp_path / "nx")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "nx-27017", "mongodb"])
def backend(request: pytest.FixtureRequest) -> Settings:
    """Dev-mode settings on each store the suite runs against.

    nx-27017 cannot watch a database, so it runs in ``collection`` scope; a real
    replica set (opt-in through TIDINGS_TEST_MONGODB_URI) runs the default
    ``database`` scope.
    """
    database = f"t_{uuid.uuid4().hex[:12]}"
    if request.param == "embedded":
        return Settings(dev=True)
    if request.param == "nx-27017":
        nx: NxServer = request.getfixturevalue("nx")
        return Settings(
            dev=True, mongodb_uri=nx.uri, database=database, change_stream_scope="collection"
        )
    if REAL_MONGODB_URI is None:
        pytest.skip("set TIDINGS_TEST_MONGODB_URI to a replica set to run against MongoDB")
    return Settings(dev=True, mongodb_uri=REAL_MONGODB_URI, database=database)


@pytest.fixture
async def server(backend: Settings) -> AsyncIterator[str]:
    """A real uvicorn server running the app on each backend; its ``ws://`` URL."""
    async with serve(backend) as url:
        yield url
