"""The message state machine: where a message is on its way, and which moves are forward.

Every layer shares it (the engines, the recorder, the outbox, the frames), so
it depends on nothing else of Tidings.
"""

from __future__ import annotations

from enum import StrEnum


class MessageState(StrEnum):
    """Where a message is on its way; states only move forward."""

    RECEIVED = "received"
    STORED = "stored"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"


# The states a store records, in the order a message passes them. ``received``
# comes before them and is never recorded; ``failed`` ends a message that was
# never stored.
RECORDED = (MessageState.STORED, MessageState.SENT, MessageState.DELIVERED, MessageState.READ)

_RANK = {MessageState.RECEIVED: 0} | {state: rank for rank, state in enumerate(RECORDED, 1)}

# States in which a message still waits for its recipient's client: the backlog.
PENDING = frozenset({MessageState.STORED, MessageState.SENT})
# States in which it is owed to nobody any more: retention counts from them.
FINISHED = frozenset({MessageState.DELIVERED, MessageState.READ})


def advances(current: MessageState, new: MessageState) -> bool:
    """True when moving from ``current`` to ``new`` is a forward transition.

    ``failed`` is terminal and only reachable before a message is stored; every
    other state may only be followed by a later one, so stale or repeated
    transitions are no-ops.
    """
    if current is MessageState.FAILED:
        return False
    if new is MessageState.FAILED:
        return current is MessageState.RECEIVED
    return _RANK[new] > _RANK[current]


def earlier_than(state: MessageState) -> list[str]:
    """The recorded states a message may be in for ``state`` to be a step forward."""
    return [s.value for s in RECORDED if advances(s, state)]
