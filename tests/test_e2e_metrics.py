"""End to end: ``/metrics`` of a real server moves as real clients talk.

Counters are compared before and after, never timings: a latency histogram is
checked for its count of observations only.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TIMEOUT, client, free_port, serve
from tests.processes import serving
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
MALLORY = "mallory@example.com"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    """Every sample ``url`` exposes, by name and labels, as Prometheus parses them."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metrics_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").removesuffix("/ws") + "/metrics"


class Delta:
    """How far each sample moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self._before, self._after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return self._after[key] - self._before.get(key, 0.0)


async def test_a_conversation_moves_the_counters_it_should() -> None:
    # A low rate for everyone; only Mallory sends enough frames to go over it.
    settings = Settings(dev=True, rate_limit=1.0, rate_burst=20)
    async with serve(settings) as url:
        http = metrics_url(url)
        before = await scrape(http)
        assert before[("tidings_connections", frozenset())] == 0
        async with client(url) as alice, client(url) as bob:
            await alice.identify(ALICE)
            await bob.identify(BOB)
            during = Delta(before, await scrape(http))
            assert during("tidings_connections") == 2
            assert during("tidings_connections_opened_total") == 2
            assert during("tidings_identified_users") == 2

            await alice.send_message(BOB, "hello bob", id="m1")
            assert (await bob.recv())["id"] == "m1"
            assert await alice.states("m1", until="sent") == ["received", "stored", "sent"]
            await bob.send({"type": "ack", "id": "m1"})
            assert await alice.states("m1", until="delivered") == ["delivered"]
            await bob.send({"type": "read", "id": "m1"})
            assert await alice.states("m1", until="read") == ["read"]
            await alice.send_message("nobody@example.com", "anyone there?", id="m2")
            assert await alice.states("m2", until="failed") == ["received", "failed"]
            await bob.send("this is not JSON")
            assert (await bob.recv())["code"] == "bad_json"

            async with client(url) as mallory:
                await mallory.identify(MALLORY)
                for n in range(40):
                    await mallory.send({"type": "#ping", "ts": n})
                replies = [await mallory.recv() for _ in range(40)]
            limited = sum(1 for reply in replies if reply.get("code") == "rate_limited")
            assert limited > 0
            chat = Delta(before, await scrape(http))

        async with asyncio.timeout(TIMEOUT):  # the server ends connections after the clients
            while True:
                after = await scrape(http)
                if Delta(before, after)("tidings_connections_closed_total", code="1000") == 3:
                    break
                await asyncio.sleep(0.05)

    frames_in = "tidings_frames_received_total"
    assert chat(frames_in, type="#email") == 3
    assert chat(frames_in, type="message") == 2
    assert chat(frames_in, type="ack") == 1
    assert chat(frames_in, type="read") == 1
    assert chat(frames_in, type="#ping") == 40 - limited
    assert chat(frames_in, type="invalid") == 1 + limited
    frames_out = "tidings_frames_sent_total"
    assert chat(frames_out, type="message") == 1
    assert chat(frames_out, type="state") == 7  # m1: received to read; m2: received, failed
    assert chat(frames_out, type="#email") == 3
    assert chat(frames_out, type="#pong") == 40 - limited
    assert chat(frames_out, type="error") == 1 + limited
    for state in ("stored", "sent", "delivered", "read", "failed"):
        assert chat("tidings_messages_total", state=state) == 1, state
    assert chat("tidings_messages_total", state="received") == 2
    assert chat("tidings_error_frames_total", code="bad_json") == 1
    assert chat("tidings_error_frames_total", code="rate_limited") == limited
    assert chat("tidings_rate_limited_frames_total") == limited
    # Bob was online, but his backlog read may still have been under way: either path.
    delivered = sum(
        chat("tidings_delivery_latency_seconds_count", source=source)
        for source in ("live", "backlog")
    )
    assert delivered == 1
    store = "tidings_store_operation_duration_seconds_count"
    assert chat(store, operation="send") == 1
    assert chat(store, operation="ensure_user") == 3
    assert chat(store, operation="find_inbox") == 2
    assert chat(store, operation="find_user") == 1
    assert chat(store, operation="backlog") >= 3
    assert chat(store, operation="record") >= 1
    assert chat("tidings_store_errors_total", operation="send") == 0

    end = Delta(before, after)
    assert end("tidings_connections") == 0
    assert end("tidings_identified_users") == 0
    assert end("tidings_connections_closed_total", code="1000") == 3
    assert end("tidings_slow_consumer_disconnects_total") == 0


async def test_readiness_probes_show_in_the_metrics() -> None:
    async with serve(Settings(dev=True)) as url:
        http = metrics_url(url)
        assert (await scrape(http))[("tidings_ready", frozenset())] == 0  # not probed yet
        async with httpx.AsyncClient(timeout=TIMEOUT) as probe:
            response = await probe.get(http.removesuffix("/metrics") + "/readyz")
        assert response.status_code == 200
        samples = await scrape(http)
    assert samples[("tidings_ready", frozenset())] == 1
    assert samples[("tidings_draining", frozenset())] == 0
    assert samples[("tidings_feed_running", frozenset())] == 1
    assert samples[("tidings_readiness_changes_total", frozenset())] == 0


async def test_with_a_metrics_port_they_are_served_there_only_and_stop_with_the_app() -> None:
    port = free_port()
    async with serve(Settings(dev=True, metrics_port=port)) as url:
        own = f"http://127.0.0.1:{port}/metrics"
        samples = await scrape(own)
        assert ("tidings_connections", frozenset()) in samples
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            assert (await http.get(metrics_url(url))).status_code == 404
            assert (await http.get(own.removesuffix("/metrics") + "/readyz")).status_code == 404
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(own)


async def test_the_metrics_server_leaves_sigterm_to_the_drain(tmp_path: Path) -> None:
    """A second uvicorn in the process must not take the signal that starts the drain."""
    port = free_port()
    own = f"http://127.0.0.1:{port}/metrics"
    async with serving(tmp_path, dev="1", metrics_port=str(port), drain_delay="1") as served:
        assert (await scrape(own))[("tidings_draining", frozenset())] == 0
        served.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):  # scraped while it drains, then it exits
            while True:
                if (await scrape(own))[("tidings_draining", frozenset())] == 1:
                    break
                await asyncio.sleep(0.05)
        assert await asyncio.wait_for(served.process.wait(), TIMEOUT) == 0
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(own)
