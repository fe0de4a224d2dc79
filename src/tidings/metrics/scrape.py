"""What one scrape reports: the counts of a ``Metrics``, and the state of what it watches.

A prometheus_client collector, registered by ``exposition.registry_of``:
it runs when ``/metrics`` is asked for, on the event loop's thread, so it may
read the sessions and the feed directly.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tidings.engine.base import FeedHealth
from tidings.metrics.counts import Metrics


class Scrape:
    """The collector: a ``Metrics``' counts and bound sources, as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """The metric families of this moment."""
        m = self._metrics
        yield _gauge("tidings_connections", "Open WebSocket connections.", len(m.connections()))
        yield _counter(
            "tidings_connections_opened_total", "WebSocket connections accepted.", m.opened
        )
        yield _counter(
            "tidings_connections_closed_total",
            "WebSocket connections ended, by close code (other: a code not listed).",
            m.closed,
            "code",
        )
        yield _counter(
            "tidings_handshakes_refused_total",
            "WebSocket handshakes refused, by HTTP status (403 forbidden, 503 draining).",
            m.refused,
            "status",
        )
        yield _gauge("tidings_identified_users", "Users with a connection here.", m.users())
        yield _counter(
            "tidings_frames_received_total",
            "Frames read from clients, by type (invalid: refused before it had one).",
            m.frames_in,
            "type",
        )
        yield _counter(
            "tidings_frames_sent_total",
            "Frames written to clients, by type.",
            m.frames_out,
            "type",
        )
        yield _counter(
            "tidings_error_frames_total",
            "Error frames queued for clients, by code.",
            m.error_frames,
            "code",
        )
        yield _counter(
            "tidings_rate_limited_frames_total",
            "Frames dropped because their connection was over its rate.",
            m.rate_limited,
        )
        yield _counter(
            "tidings_messages_total",
            "Messages reaching a state, by state.",
            {state.value: count for state, count in m.messages.items()},
            "state",
        )
        delivery = HistogramMetricFamily(
            "tidings_delivery_latency_seconds",
            "From a message's stored time to its frame written to the recipient, first delivery "
            "only, by source (live: the change feed; backlog: read from the store).",
            labels=["source"],
        )
        for backlog, histogram in m.delivery.items():
            source = "backlog" if backlog else "live"
            delivery.add_metric([source], histogram.cumulative(), histogram.sum)
        yield delivery
        store = HistogramMetricFamily(
            "tidings_store_operation_duration_seconds",
            "Store calls, by operation, failed ones included.",
            labels=["operation"],
        )
        for operation, histogram in m.store_seconds.items():
            store.add_metric([operation], histogram.cumulative(), histogram.sum)
        yield store
        yield _counter(
            "tidings_store_errors_total",
            "Store calls that raised StoreUnavailable, by operation.",
            m.store_errors,
            "operation",
        )
        yield from self._queues()
        yield _counter(
            "tidings_slow_consumer_disconnects_total",
            "Connections closed because their client took no frame in time.",
            m.slow_consumers,
        )
        yield from self._feed_families()
        yield _gauge("tidings_draining", "1 while the server drains for shutdown.", m.draining())
        yield _gauge("tidings_ready", "1 when /readyz last answered 200.", m.ready is True)
        yield _counter(
            "tidings_readiness_changes_total",
            "Times /readyz changed its answer between ready and not.",
            m.ready_changes,
        )

    def _queues(self) -> Iterator[Metric]:
        depths = [connection.queued for connection in self._metrics.connections()]
        yield _gauge(
            "tidings_send_queue_frames",
            "Frames waiting to be written, all connections.",
            sum(depths),
        )
        yield _gauge(
            "tidings_send_queue_max_frames",
            "Frames waiting for the connection furthest behind.",
            max(depths, default=0),
        )

    def _feed_families(self) -> Iterator[Metric]:
        feed = self._metrics.feed
        running = feed is not None and feed.running
        health = feed.health() if feed is not None else FeedHealth()
        yield _gauge("tidings_feed_running", "1 while the feed delivers events.", running)
        yield _gauge(
            "tidings_feed_lag_seconds",
            "Seconds since the feed last confirmed it had delivered everything stored before.",
            health.lag_seconds,
        )
        for name, value, doc in (
            ("resumes", health.resumes, "Interruptions the feed recovered from its last position."),
            (
                "restarts",
                health.restarts,
                "Times the feed began again from now, and sessions re-read what they may have "
                "missed.",
            ),
            ("interruptions", health.interruptions, "Errors that stopped the feed."),
            ("poison_events", health.skipped_events, "Feed events skipped as undecodable."),
        ):
            yield _counter(f"tidings_feed_{name}_total", doc, value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(
    name: str, doc: str, values: int | dict[str, int], label: str | None = None
) -> CounterMetricFamily:
    if isinstance(values, int):
        return CounterMetricFamily(name, doc, value=values)
    assert label is not None
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
