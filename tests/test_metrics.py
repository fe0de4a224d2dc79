"""The metrics alone: the lock-free histogram, what a scrape reports, and the timed store seam.

Scrapes are read back with prometheus_client's own parser, as Prometheus would
read them. Nothing here measures a duration: store timings are only counted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import ALICE, BOB, FlakyStore
from tidings.engine import FeedHealth
from tidings.engine.memory import MemoryFeed, memory_engine
from tidings.errors import StoreUnavailable
from tidings.metrics.counts import DELIVERY_BUCKETS, STORE_OPERATIONS, Histogram, Metrics
from tidings.metrics.exposition import registry_of
from tidings.metrics.timed import TimedStore
from tidings.models import Draft, Transition
from tidings.states import MessageState

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """Every sample of one scrape, by name and labels."""
    text = generate_latest(registry_of(metrics)).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class Queue:
    """A connection as the metrics see it: frames waiting for its client."""

    def __init__(self, queued: int) -> None:
        self.queued = queued


class StatsFeed(MemoryFeed):
    """A feed with something to tell about itself, as a change feed after trouble."""

    def health(self) -> FeedHealth:
        return FeedHealth(lag_seconds=0.5, resumes=3, restarts=2, interruptions=5, skipped_events=1)

    @property
    def running(self) -> bool:
        return True


# --- the histogram -------------------------------------------------------------------


def test_a_value_on_a_bound_falls_in_that_bucket_and_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.1", 2.0), ("1", 4.0), ("+Inf", 5.0)]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(8.65)


def test_since_a_moment_ahead_of_this_clock_counts_as_zero() -> None:
    histogram = Histogram(DELIVERY_BUCKETS)
    histogram.since(datetime.now(UTC) + timedelta(hours=1))  # another process's clock runs ahead
    assert histogram.sum == 0.0
    assert histogram.cumulative()[0] == ("0.001", 1.0)
    histogram.since(datetime.now(UTC) - timedelta(hours=2))  # a new moment, not the one kept
    assert histogram.counts[-1] == 1  # above the top bucket, an hour


# --- what a scrape reports -----------------------------------------------------------


def test_an_unbound_metrics_scrapes_every_family_at_zero() -> None:
    samples = scrape(Metrics())
    assert value(samples, "tidings_connections") == 0
    assert value(samples, "tidings_identified_users") == 0
    assert value(samples, "tidings_feed_running") == 0
    assert value(samples, "tidings_ready") == 0
    assert value(samples, "tidings_frames_received_total", type="message") == 0
    assert value(samples, "tidings_messages_total", state="delivered") == 0
    for operation in STORE_OPERATIONS:
        name = "tidings_store_operation_duration_seconds_count"
        assert value(samples, name, operation=operation) == 0
    assert value(samples, "tidings_delivery_latency_seconds_count", source="live") == 0
    assert (
        value(samples, "tidings_delivery_latency_seconds_bucket", source="backlog", le="+Inf") == 0
    )
    assert any(name.startswith("process_") for name, _ in samples)


def test_two_metrics_keep_registries_and_counts_of_their_own() -> None:
    one, two = Metrics(), Metrics()
    one.frames_in["#ping"] += 2
    one.messages[MessageState.STORED] += 1
    assert value(scrape(one), "tidings_frames_received_total", type="#ping") == 2
    assert value(scrape(one), "tidings_messages_total", state="stored") == 1
    assert value(scrape(two), "tidings_frames_received_total", type="#ping") == 0


def test_close_codes_outside_the_known_few_count_as_other() -> None:
    metrics = Metrics()
    for code in (1000, 1008, 4321, 3000, 1006):
        metrics.connection_closed(code)
    samples = scrape(metrics)
    closed = "tidings_connections_closed_total"
    assert value(samples, closed, code="1000") == 1
    assert value(samples, closed, code="1008") == 1
    assert value(samples, closed, code="1006") == 1
    assert value(samples, closed, code="other") == 2
    assert not any(("code", "4321") in labels for _, labels in samples)


def test_readiness_counts_changes_of_answer_not_the_first_answer() -> None:
    metrics = Metrics()
    for ready in (True, True, False, True, True):
        metrics.readiness(ready)
    samples = scrape(metrics)
    assert value(samples, "tidings_ready") == 1
    assert value(samples, "tidings_readiness_changes_total") == 2


def test_bound_sources_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    queues = [Queue(3), Queue(0), Queue(40)]
    draining = [False]
    metrics.bind(
        connections=lambda: queues,
        users=lambda: 2,
        draining=lambda: draining[0],
        feed=StatsFeed(),
    )
    draining[0] = True
    queues.append(Queue(1))
    samples = scrape(metrics)
    assert value(samples, "tidings_connections") == 4
    assert value(samples, "tidings_identified_users") == 2
    assert value(samples, "tidings_send_queue_frames") == 44
    assert value(samples, "tidings_send_queue_max_frames") == 40
    assert value(samples, "tidings_draining") == 1
    assert value(samples, "tidings_feed_running") == 1
    assert value(samples, "tidings_feed_lag_seconds") == 0.5
    assert value(samples, "tidings_feed_resumes_total") == 3
    assert value(samples, "tidings_feed_restarts_total") == 2
    assert value(samples, "tidings_feed_interruptions_total") == 5
    assert value(samples, "tidings_feed_poison_events_total") == 1


def test_a_feed_with_nothing_to_tell_reports_zeros() -> None:
    metrics = Metrics()
    metrics.bind(connections=list, users=lambda: 0, draining=lambda: False, feed=MemoryFeed())
    samples = scrape(metrics)
    assert value(samples, "tidings_feed_running") == 0  # not started
    assert value(samples, "tidings_feed_resumes_total") == 0
    assert value(samples, "tidings_feed_lag_seconds") == 0


# --- the timed store -----------------------------------------------------------------


async def test_the_timed_store_observes_each_call_by_operation() -> None:
    metrics = Metrics()
    inner = FlakyStore(memory_engine().store)
    store = TimedStore(inner, metrics)
    await store.start()
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    [outcome] = await store.send(ALICE, "c1", [Draft("m1", BOB, "hi")])
    assert outcome.stored is not None
    [message] = await store.backlog(BOB, None, None, 10)
    await store.record([Transition.of(message, MessageState.DELIVERED)])
    assert await store.find_inbox(BOB, ["m1"])
    assert await store.find_user(ALICE) is not None
    await store.states_since(ALICE, datetime(2000, 1, 1, tzinfo=UTC))
    await store.ping()
    await store.close()
    counts = {op: metrics.store_seconds[op].count for op in STORE_OPERATIONS}
    assert counts == dict.fromkeys(STORE_OPERATIONS, 1) | {"ensure_user": 2}
    assert inner.calls.count("send") == 1
    assert metrics.store_errors == dict.fromkeys(STORE_OPERATIONS, 0)


async def test_the_timed_store_counts_a_failed_call_and_passes_its_error_on() -> None:
    metrics = Metrics()
    inner = FlakyStore(memory_engine().store)
    inner.fail.add("ping")
    store = TimedStore(inner, metrics)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    assert store.inner is inner
    assert metrics.store_errors["ping"] == 1
    assert metrics.store_seconds["ping"].count == 1  # a failed call takes time too
    samples = scrape(metrics)
    assert value(samples, "tidings_store_errors_total", operation="ping") == 1
