"""Reconnect delays: exponential backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: attempt ``n`` waits ``U(0, min(cap, base * 2**n))``.

    Full jitter spreads the reconnects of many clients that lost one server at
    the same moment, so they do not all come back at once. ``random`` returns a
    float in ``[0, 1)``; tests inject their own.
    """

    base: float = 0.1
    cap: float = 10.0
    random: Callable[[], float] = field(default=random.random, repr=False)

    def ceiling(self, attempt: int) -> float:
        """The longest delay attempt ``attempt`` (0 for the first) may wait."""
        # Bounding the exponent keeps 2**attempt from overflowing a float.
        return min(self.cap, self.base * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int) -> float:
        """How long to wait before attempt ``attempt``: in ``[0, ceiling(attempt))``."""
        return self.random() * self.ceiling(attempt)
