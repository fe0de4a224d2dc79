"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tests.helpers import serve
from tidings.config import Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from what each test says, not from the shell that runs the suite."""
    for name in list(os.environ):
        if name.startswith("TIDINGS_") and not name.startswith("TIDINGS_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings() -> Settings:
    """Dev-mode settings on the embedded store."""
    return Settings(dev=True)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    """A real uvicorn server running the app; its ``ws://`` URL."""
    async with serve(settings) as url:
        yield url
