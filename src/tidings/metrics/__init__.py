"""What ``/metrics`` exposes, and how it is counted and served.

The counts on the path of every frame are plain integers and lock-free
histograms, not prometheus_client's metric objects: an ``inc()`` of those
takes a lock and cost about 0.9 µs here, an ``observe()`` 1.7 µs, against
0.1 µs for an integer, and a message crosses a dozen of them. Every count is
taken on the event loop's thread and every scrape is answered there too (see
``exposition``), so nothing needs a lock. A collector turns the counts into
metric families when Prometheus scrapes (``scrape``); what other objects know
(open connections, users, the feed's health) is read from them then, and
costs nothing in between.

The family: ``counts`` (``Metrics``, ``Histogram``: what the code counts into),
``timed`` (the ``Store`` wrapper that times every call at the seam), ``scrape``
(the collector that turns counts and live state into metric families) and
``exposition`` (the registry, the route, or a server on a port of its own).

Labels are bounded sets fixed here: frame types, states, error codes, store
operations, a few close codes. Never an e-mail or an id.
"""

from __future__ import annotations

from tidings.metrics.counts import Histogram, Metrics

__all__ = ["Histogram", "Metrics"]
