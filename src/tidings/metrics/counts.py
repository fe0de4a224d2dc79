"""The counts behind ``/metrics``: plain integers and lock-free histograms, one ``Metrics`` an app.

Why plain integers, and which labels, is in the package's docstring.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Protocol

from tidings.engine.base import Feed
from tidings.errors import CloseCode, ErrorCode
from tidings.states import MessageState

# Store calls take well under a millisecond in memory and a few on a nearby
# replica set; the top buckets bracket the 5 s database budget.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Live delivery takes milliseconds; a backlog read on identification may
# deliver what waited for hours, which the top buckets keep apart.
DELIVERY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1, 2.5, 5, 10, 30, 60, 300, 3600),
)

FRAMES_IN = ("#email", "#ping", "#user", "message", "ack", "read", "invalid")
FRAMES_OUT = ("message", "state", "#email", "#pong", "#user", "error")
STORE_OPERATIONS = (
    "ping",
    "ensure_user",
    "find_user",
    "send",
    "find_inbox",
    "backlog",
    "record",
    "states_since",
)
# The close codes an operator tells apart; a client may close with any of
# thousands, which would each make a series.
CLOSE_CODES = frozenset({1000, 1001, 1006, 1009} | {int(code) for code in CloseCode})


class Histogram:
    """A histogram of seconds without a lock: observed and read on one thread."""

    __slots__ = ("_epoch", "_moment", "bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is above every bound
        self.sum = 0.0
        self._moment: datetime | None = None
        self._epoch = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        # bisect_left: a value equal to a bound belongs to it ("le").
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def since(self, moment: datetime) -> None:
        """Observe the seconds from ``moment`` to now; never below zero, as clocks differ."""
        # Per message written: timestamp() is the dearest step, and messages stored
        # in one millisecond share one datetime (models.utcnow), so the last is kept.
        if moment is not self._moment:
            self._moment, self._epoch = moment, moment.timestamp()
        self.observe(max(0.0, time.time() - self._epoch))

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus states them: cumulative, ending with ``+Inf``."""
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", float(total)))
        return buckets


class Queued(Protocol):
    """A connection, as far as metrics see it: how many frames wait for its client."""

    @property
    def queued(self) -> int: ...


class Metrics:
    """Every number Tidings exposes, for one app; ``exposition.registry_of`` scrapes it.

    The rest of the code counts into the attributes (or calls the small
    methods, off the per-frame path); ``bind`` names, once the lifespan has
    built them, the objects whose state is read at scrape time.
    """

    def __init__(self) -> None:
        # Counters, not dicts: a key not listed (a frame type added later) counts
        # from zero instead of raising on the path of a frame.
        self.frames_in = Counter(dict.fromkeys(FRAMES_IN, 0))
        self.frames_out = Counter(dict.fromkeys(FRAMES_OUT, 0))
        self.error_frames = Counter({code.value: 0 for code in ErrorCode})
        self.messages = Counter(dict.fromkeys(MessageState, 0))
        # By whether the message came from the backlog (True) or live (False).
        self.delivery = {False: Histogram(DELIVERY_BUCKETS), True: Histogram(DELIVERY_BUCKETS)}
        self.store_seconds = {op: Histogram(STORE_BUCKETS) for op in STORE_OPERATIONS}
        self.store_errors = dict.fromkeys(STORE_OPERATIONS, 0)
        self.opened = 0
        self.closed = {str(code): 0 for code in sorted(CLOSE_CODES)} | {"other": 0}
        self.refused = {"403": 0, "503": 0}
        self.slow_consumers = 0
        self.rate_limited = 0
        self.ready: bool | None = None  # the last answer of /readyz; None before the first
        self.ready_changes = 0
        self._connections: Callable[[], Collection[Queued]] = tuple
        self._users: Callable[[], int] = int
        self._draining: Callable[[], bool] = bool
        self._feed: Feed | None = None

    def bind(
        self,
        *,
        connections: Callable[[], Collection[Queued]],
        users: Callable[[], int],
        draining: Callable[[], bool],
        feed: Feed,
    ) -> None:
        """Read these at scrape time: the open connections, users, drain state and feed."""
        self._connections, self._users, self._draining = connections, users, draining
        self._feed = feed

    def connection_closed(self, code: int) -> None:
        """A connection ended with ``code``, as the endpoint last saw it."""
        self.closed[str(code) if code in CLOSE_CODES else "other"] += 1

    def handshake_refused(self, status: int) -> None:
        """A handshake was answered with an HTTP ``status`` (403 or 503)."""
        self.refused[str(status)] = self.refused.get(str(status), 0) + 1

    def connections(self) -> Collection[Queued]:
        """The open connections, as bound."""
        return self._connections()

    def users(self) -> int:
        """Users with a connection on this process, as bound."""
        return self._users()

    def draining(self) -> bool:
        """Whether the server drains, as bound."""
        return self._draining()

    @property
    def feed(self) -> Feed | None:
        """The change feed, once bound."""
        return self._feed

    def readiness(self, ready: bool) -> None:
        """``/readyz`` answered; count the answers that changed."""
        if self.ready is not None and self.ready != ready:
            self.ready_changes += 1
        self.ready = ready
