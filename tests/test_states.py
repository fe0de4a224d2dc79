"""The message state machine (``tidings.states``)."""

from __future__ import annotations

import itertools

import pytest

from tidings.states import RECORDED, MessageState, advances, earlier_than

S = MessageState
ORDER = [S.RECEIVED, S.STORED, S.SENT, S.DELIVERED, S.READ]


# --- the state machine ------------------------------------------------------------------


def expected_advance(current: MessageState, new: MessageState) -> bool:
    if current is S.FAILED:
        return False
    if new is S.FAILED:
        return current is S.RECEIVED
    return ORDER.index(new) > ORDER.index(current)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(S, S)))
def test_advances_over_every_pair(current: MessageState, new: MessageState) -> None:
    assert advances(current, new) is expected_advance(current, new)


def test_advances_spot_checks() -> None:
    assert advances(S.RECEIVED, S.STORED)
    assert advances(S.STORED, S.READ)
    assert not advances(S.SENT, S.SENT)
    assert not advances(S.READ, S.DELIVERED)
    assert advances(S.RECEIVED, S.FAILED)
    assert not advances(S.STORED, S.FAILED)
    assert not advances(S.FAILED, S.READ)


@pytest.mark.parametrize("state", list(S))
def test_earlier_than_every_state(state: MessageState) -> None:
    expected = [s.value for s in ORDER if s is not S.RECEIVED and expected_advance(s, state)]
    assert earlier_than(state) == expected


def test_earlier_than_values() -> None:
    assert earlier_than(S.RECEIVED) == []
    assert earlier_than(S.STORED) == []
    assert earlier_than(S.SENT) == ["stored"]
    assert earlier_than(S.DELIVERED) == ["stored", "sent"]
    assert earlier_than(S.READ) == ["stored", "sent", "delivered"]
    assert earlier_than(S.FAILED) == []


def test_recorded_is_the_order_after_received() -> None:
    assert list(RECORDED) == ORDER[1:]
