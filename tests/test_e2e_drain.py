"""End to end: SIGTERM drains the server as the spec's Operations section says."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.helpers import TIMEOUT, client, free_port
from tests.processes import wait_until_ready

pytestmark = pytest.mark.e2e


async def test_sigterm_turns_unready_refuses_new_clients_then_closes_with_1012() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(TIDINGS_DEV="1", TIDINGS_PORT=str(port), TIDINGS_DRAIN_DELAY="3")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}", process)
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            client(url) as alice,
            client(url) as bob,
        ):
            await alice.identify("alice@example.com")
            await bob.identify("bob@example.com")
            process.send_signal(signal.SIGTERM)

            # Within the drain delay: not ready, new clients refused, old ones served.
            async with asyncio.timeout(TIMEOUT):
                while True:
                    ready = await http.get("/readyz")
                    if ready.status_code == 503:
                        break
                    await asyncio.sleep(0.02)
            assert "draining" in ready.json()["reason"]
            with pytest.raises(InvalidStatus) as refused:
                async with client(url):
                    pass
            assert refused.value.response.status_code == 503
            await alice.send_message("bob@example.com", "last words", id="last")
            assert (await bob.recv())["content"] == "last words"

            # Then every client is told to reconnect elsewhere.
            for ws in (alice, bob):
                close = await ws.close_frame()
                assert close.code == 1012
                assert "reconnect" in close.reason
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    logs = (await process.stderr.read()).decode() if process.stderr else ""
    # JSON lines, however the formatter spaces them; anything else (a traceback) is not an event.
    events = [orjson.loads(line).get("event") for line in logs.splitlines() if line.startswith("{")]
    assert "draining" in events
