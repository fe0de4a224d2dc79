"""One user's received messages in the memory engine, and the indexes over them.

Positions are handed out densely, but messages leave again when their
retention runs out, from anywhere in the inbox (an old message that is still
owed stays while later, delivered ones go). So messages are held by position
in a dictionary, and ``order`` keeps the positions ascending for reading from
a position on; positions that left are skipped on reading and dropped once
they are half the list, so reading stays proportional to what it returns.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from tidings.models import Message, Position
from tidings.states import PENDING

# Stale entries a list may hold before it is compacted; below it, compacting
# would cost more than skipping them.
_SLACK = 64


@dataclass(slots=True)
class Inbox:
    """One user's received messages and the indexes over them."""

    messages: dict[Position, Message] = field(default_factory=dict)
    # When each message reached its current state.
    at: dict[Position, datetime] = field(default_factory=dict)
    order: list[Position] = field(default_factory=list)
    removed: int = 0
    last: int = 0
    by_key: dict[tuple[str, str], Position] = field(default_factory=dict)
    # A message's position by its id alone; ids are unique per sender only, so
    # positions of an id that several senders used go to ``more_by_id``. A list
    # an id would be an object more a message for every full garbage collection
    # to walk: with 100,000 messages those lists and the receipts' objects were
    # two thirds of the heap it walked, 125 ms a collection.
    by_id: dict[str, Position] = field(default_factory=dict)
    more_by_id: dict[str, list[Position]] = field(default_factory=lambda: defaultdict(list))
    # Positions of messages that were pending when stored, ascending. Entries
    # that have since been delivered are skipped on reading and dropped once
    # they are half the list, so reading stays proportional to what it returns.
    pending: list[Position] = field(default_factory=list)
    gone: int = 0

    def get(self, position: Position) -> Message:
        """The message at ``position``, which must be held."""
        return self.messages[position]

    def next_position(self) -> Position:
        """The position the next stored message takes."""
        return Position(self.last + 1)

    def add(self, message: Message, at: datetime) -> None:
        """Hold a newly stored message, at the next position."""
        position = message.position
        self.last = position
        self.messages[position] = message
        self.at[position] = at
        self.order.append(position)
        self.by_key[message.key] = position
        if message.id in self.by_id:
            self.more_by_id[message.id].append(position)
        else:
            self.by_id[message.id] = position
        self.pending.append(position)

    def remove(self, message: Message) -> None:
        """Let go of a finished message whose retention ran out."""
        position = message.position
        del self.messages[position], self.at[position], self.by_key[message.key]
        others = self.more_by_id.get(message.id)
        if self.by_id[message.id] == position:
            if others:
                self.by_id[message.id] = others.pop(0)
            else:
                del self.by_id[message.id]
        elif others is not None:
            others.remove(position)
        if others is not None and not others:
            del self.more_by_id[message.id]
        self.removed += 1
        if self.removed > _SLACK and self.removed * 2 > len(self.order):
            self.order = [p for p in self.order if p in self.messages]
            self.removed = 0

    def with_id(self, message_id: str) -> list[Message]:
        """The messages with this id, from any sender."""
        first = self.by_id.get(message_id)
        if first is None:
            return []
        return [self.get(first), *map(self.get, self.more_by_id.get(message_id, ()))]

    def pending_after(self, after: int, until: int | None, limit: int) -> list[Message]:
        """Up to ``limit`` pending messages after ``after`` (up to ``until``), oldest first."""
        found: list[Message] = []
        for index in range(bisect.bisect_right(self.pending, after), len(self.pending)):
            position = self.pending[index]
            if len(found) == limit or (until is not None and position > until):
                break
            message = self.messages.get(position)
            if message is not None and message.state in PENDING:
                found.append(message)
        return found

    def after(self, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages after position ``after``, in any state, oldest first."""
        found: list[Message] = []
        for index in range(bisect.bisect_right(self.order, after), len(self.order)):
            if len(found) == limit:
                break
            message = self.messages.get(self.order[index])
            if message is not None:
                found.append(message)
        return found

    def left_pending(self) -> None:
        """Count a message that was delivered; compact ``pending`` when stale entries pile up."""
        self.gone += 1
        if self.gone > _SLACK and self.gone * 2 > len(self.pending):
            self.pending = [
                p
                for p in self.pending
                if (m := self.messages.get(p)) is not None and m.state in PENDING
            ]
            self.gone = 0
