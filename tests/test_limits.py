"""Per-connection limits: the token bucket and the nesting depth of a frame."""

from __future__ import annotations

from typing import Any

import pytest

from tidings.limits import TokenBucket, depth


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def takes(bucket: TokenBucket, n: int) -> list[bool]:
    return [bucket.take() for _ in range(n)]


# --- TokenBucket ------------------------------------------------------------------------


def test_a_burst_is_allowed_then_refused() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert takes(bucket, 5) == [True] * 5
    assert bucket.strikes == 0
    assert bucket.take() is False
    assert bucket.strikes == 1
    assert bucket.take() is False
    assert bucket.strikes == 2


def test_tokens_refill_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    takes(bucket, 5)
    assert bucket.take() is False
    clock.advance(0.1)  # one token
    assert bucket.take() is True
    assert bucket.take() is False
    clock.advance(0.35)  # three and a half tokens
    assert takes(bucket, 4) == [True, True, True, False]


def test_refill_stops_at_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    takes(bucket, 5)
    clock.advance(3600)
    assert takes(bucket, 6) == [True] * 5 + [False]


def test_a_fresh_bucket_does_not_refill_beyond_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=3, clock=clock)
    clock.advance(10)
    assert takes(bucket, 4) == [True, True, True, False]


def test_strikes_grow_under_sustained_flooding() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=10, clock=clock)
    history = []
    for _ in range(10):  # ten seconds at 100 frames a second, ten times the rate
        for _ in range(100):
            clock.advance(0.01)
            bucket.take()
        history.append(bucket.strikes)
    assert history == sorted(history)
    assert history[-1] > history[0]
    # About 90 refused frames a second, less the 10 a second drained.
    assert history[-1] >= 600


def test_strikes_drain_at_a_quarter_of_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    takes(bucket, 52)
    assert bucket.strikes == 50
    clock.advance(2)  # drains 2 s x 10 / 4 = 5
    bucket.take()
    assert bucket.strikes == pytest.approx(45)
    clock.advance(100)
    assert bucket.take() is True
    assert bucket.strikes == 0


def test_strikes_stay_low_for_a_client_slightly_over_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=20, clock=clock)
    refused = 0
    for _ in range(60 * 11):  # a minute at 11 frames a second against a rate of 10
        clock.advance(1 / 11)
        refused += not bucket.take()
        assert bucket.strikes < 2
    assert refused > 0  # it really was over its rate


def test_strikes_grow_for_a_client_half_again_over_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=20, clock=clock)
    for _ in range(60 * 15):  # a minute at 15 frames a second against a rate of 10
        clock.advance(1 / 15)
        bucket.take()
    # About 5 refused a second, 2.5 drained: some 150 after a minute, less the burst.
    assert bucket.strikes > 100


def test_the_default_clock_is_monotonic_time() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take() is True


# --- depth ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1.5, "deep", None, True, ""])
def test_flat_values_have_depth_0(value: Any) -> None:
    assert depth(value, 32) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, 1),
        ([], 1),
        ({"a": 1, "b": "x"}, 1),
        ([1, 2, 3], 1),
        ({"a": {}}, 2),
        ([[]], 2),
        ({"a": [1, {"b": [2]}]}, 4),
        ([1, [2, [3, [4]]], {"x": 1}], 4),
        ({"shallow": 1, "deep": {"a": {"b": {"c": []}}}, "also": [[]]}, 5),
        ([{"a": [[[]]]}, []], 5),
    ],
)
def test_nesting_is_counted_for_objects_and_arrays(value: Any, expected: int) -> None:
    assert depth(value, 32) == expected


def nested(levels: int, kind: str = "list") -> Any:
    """``levels`` nested containers, built without recursion."""
    value: Any = 0
    for i in range(levels):
        value = [value] if kind == "list" or i % 2 else {"k": value}
    return value


def test_counting_stops_past_the_limit() -> None:
    assert depth(nested(10), 10) == 10
    assert depth(nested(11), 10) == 11
    assert depth(nested(50), 10) == 11
    assert depth(nested(50, "mixed"), 3) == 4
    assert depth(nested(3), 0) == 1


def test_a_deep_structure_does_not_exhaust_the_stack() -> None:
    deep = nested(100_000, "mixed")
    assert depth(deep, 32) == 33
    assert depth(deep, 200_000) == 100_000


def test_a_wide_structure_is_counted() -> None:
    wide: dict[str, Any] = {str(i): [i] for i in range(10_000)}
    wide["x"] = [[[]]]
    assert depth(wide, 32) == 4
