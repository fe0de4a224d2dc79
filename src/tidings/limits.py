"""Limits on what one connection may ask of the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class TokenBucket:
    """A per-connection rate limit: ``rate`` frames a second, bursts up to ``burst``.

    ``strikes`` counts refused frames and drains at a quarter of ``rate``: a
    client that now and then goes over its rate keeps it low, one that keeps
    sending a quarter more than it may drives it up, so that sustained abuse,
    not a burst, ends a connection.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self.strikes = 0.0

    def take(self) -> bool:
        """Spend one token; ``False`` when the connection is over its rate."""
        now = self._clock()
        refill = (now - self._updated) * self._rate
        self._updated = now
        self._tokens = min(self._burst, self._tokens + refill)
        self.strikes = max(0.0, self.strikes - refill / 4)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.strikes += 1
        return False


def depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests JSON arrays and objects, counting no further than ``limit + 1``.

    Iterative, so that a hostile document cannot exhaust the interpreter's stack.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level) for child in children)
    return deepest
