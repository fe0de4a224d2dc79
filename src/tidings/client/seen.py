"""A bounded memory of the messages a client has had, keyed by (sender, id)."""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum

Key = tuple[str, str]


class Mark(Enum):
    """How far the application got with a message."""

    QUEUED = "queued"  # received, not yet taken by the application
    TAKEN = "taken"
    ACKED = "acked"
    READ = "read"


class Seen:
    """The last ``capacity`` messages by (sender, id), with how far each got.

    Ids are unique per sender only, so the sender is part of the key. The
    oldest keys are forgotten first: a message redelivered after its key was
    forgotten reaches the application again (delivery is at least once).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._marks: OrderedDict[Key, Mark] = OrderedDict()

    def __len__(self) -> int:
        return len(self._marks)

    def get(self, key: Key) -> Mark | None:
        """The mark of ``key``, or ``None`` if it was never seen (or was forgotten)."""
        return self._marks.get(key)

    def mark(self, key: Key, mark: Mark) -> None:
        """Remember ``key`` with ``mark``; forget the oldest key if over capacity."""
        self._marks[key] = mark
        self._marks.move_to_end(key)
        while len(self._marks) > self._capacity:
            self._marks.popitem(last=False)
