"""End to end: what a process does when its database is not there yet, or cannot be.

A database that does not answer is something to wait for: the server starts,
is not ready and says why, and becomes ready once the database answers,
without a restart. A URI the driver cannot parse is a mistake to report: the
command refuses to start in one line.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.helpers import TIMEOUT, client, serve
from tests.mongo import NxServer
from tests.test_e2e_mongo import wait_for_readiness
from tidings import app as app_module
from tidings.cli import main
from tidings.config import Settings

pytestmark = pytest.mark.e2e


async def test_a_server_started_before_its_database_is_ready_once_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Retries in tenths of a second, so that the test waits for the database, not the back-off.
    monkeypatch.setattr(app_module, "PREPARE_FIRST_RETRY", 0.05)
    monkeypatch.setattr(app_module, "PREPARE_LAST_RETRY", 0.2)
    nx = NxServer(tmp_path / "nx")  # its port is chosen, nothing listens on it yet
    settings = Settings(
        dev=True,
        mongodb_uri=nx.uri,
        change_stream_scope="collection",
        mongodb_timeout=0.5,
        ready_timeout=0.5,
    )
    caplog.set_level(logging.WARNING, logger="tidings.app")
    async with serve(settings) as url:
        base = url.replace("ws://", "http://").removesuffix("/ws")
        body = await wait_for_readiness(base, 503)
        async with asyncio.timeout(TIMEOUT):  # until the first attempt has failed
            while body["reason"] == "starting: the database has not answered yet":
                await asyncio.sleep(0.05)
                body = await wait_for_readiness(base, 503)
        assert body["reason"].startswith(f"starting: cannot reach {nx.uri}: database error: ")
        assert "check TIDINGS_MONGODB_URI" in body["reason"]
        # One line a failed attempt, saying which database and why, logged as
        # readiness learnt it.
        unreachable = next(r for r in caplog.records if r.message == "database_unreachable")
        assert "\n" not in unreachable.error  # type: ignore[attr-defined]
        assert "Topology Description" not in unreachable.error  # type: ignore[attr-defined]
        await asyncio.to_thread(nx.start)
        try:
            assert await wait_for_readiness(base, 200) == {"status": "ready"}
            async with client(url) as alice:
                await alice.identify("alice@example.com")
        finally:
            await asyncio.to_thread(nx.stop)


def test_a_uri_the_driver_refuses_stops_the_command_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDINGS_MONGODB_URI", "mongodb://a:b:c@/x")
    monkeypatch.setenv("TIDINGS_DEV", "1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The last line says it all; the lines before are the dev-mode warning's.
    last = err.strip().splitlines()[-1]
    assert last.startswith("tidings: refusing to start: TIDINGS_MONGODB_URI is not a MongoDB URI")
