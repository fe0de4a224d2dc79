"""The embedded engine: users, messages and presence in this process's memory.

Built for memory, not a mock of MongoDB: dictionaries and the indexes that the
access paths need, so every operation costs the same whatever an inbox holds.
Each inbox keeps its messages in a list indexed by position (positions are
dense here), a map by sender and id, and the positions of messages not yet
delivered. Writes report themselves to the in-process ``MemoryFeed``. Nothing
survives the process: the app says so loudly at start-up.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from tidings.engine.base import Engine, Sink
from tidings.models import (
    Draft,
    FeedEvent,
    Message,
    Outcome,
    Position,
    StateChanged,
    Stored,
    Transition,
    User,
    collection_for,
    utcnow,
)
from tidings.protocol import PENDING, MessageState, advances

log = logging.getLogger("tidings.engine.memory")

# Feed events handed to the hub between two yields to the event loop.
_EVENTS_PER_TURN = 32


@dataclass(slots=True)
class _Inbox:
    """One user's received messages and the indexes over them."""

    log: list[Message] = field(default_factory=list)
    at: list[datetime] = field(default_factory=list)
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
        return self.log[position - 1]

    def add(self, message: Message, at: datetime) -> None:
        self.log.append(message)
        self.at.append(at)
        self.by_key[message.key] = message.position
        if message.id in self.by_id:
            self.more_by_id[message.id].append(message.position)
        else:
            self.by_id[message.id] = message.position
        self.pending.append(message.position)

    def with_id(self, message_id: str) -> list[Message]:
        first = self.by_id.get(message_id)
        if first is None:
            return []
        return [self.get(first), *map(self.get, self.more_by_id.get(message_id, ()))]

    def pending_after(self, after: int, until: int | None, limit: int) -> list[Message]:
        found: list[Message] = []
        for index in range(bisect.bisect_right(self.pending, after), len(self.pending)):
            position = self.pending[index]
            if len(found) == limit or (until is not None and position > until):
                break
            message = self.get(position)
            if message.state in PENDING:
                found.append(message)
        return found

    def left_pending(self) -> None:
        self.gone += 1
        if self.gone > 64 and self.gone * 2 > len(self.pending):
            self.pending = [p for p in self.pending if self.get(p).state in PENDING]
            self.gone = 0


class MemoryStore:
    """``Store`` in this process's memory; every write is reported to ``publish``."""

    def __init__(self, feed: MemoryFeed) -> None:
        self._feed = feed
        self._users: dict[str, User] = {}
        self._inboxes: dict[str, _Inbox] = defaultdict(_Inbox)
        # (sender, id) -> recipient: the sender's side of each message.
        self._receipts: dict[tuple[str, str], str] = {}
        # sender -> (when, recipient, id) of each state move, in the order made.
        self._moves: dict[str, list[tuple[datetime, str, str]]] = defaultdict(list)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def ensure_user(self, email: str) -> User:
        user = self._users.get(email)
        if user is None:
            user = User(uuid.uuid4().hex, email, email.partition("@")[0], collection_for(email))
            self._users[email] = user
        return user

    async def find_user(self, email: str) -> User | None:
        return self._users.get(email)

    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        return [self._send_one(sender, conn, draft) for draft in drafts]

    def _send_one(self, sender: str, conn: str, draft: Draft) -> Outcome:
        recipient = self._receipts.get((sender, draft.id))
        if recipient is not None:
            # A resend, or the id reused for someone else: either way the answer
            # is the first message's current state.
            inbox = self._inboxes[recipient]
            position = inbox.by_key[(sender, draft.id)]
            message = inbox.get(position)
            return Outcome(draft.id, message.state, inbox.at[position - 1])
        inbox = self._inboxes[draft.recipient]
        now = utcnow()
        position = Position(len(inbox.log) + 1)
        message = Message(
            position, draft.id, sender, draft.recipient, draft.content, now, MessageState.STORED
        )
        inbox.add(message, now)
        self._receipts[(sender, draft.id)] = draft.recipient
        self._moves[sender].append((now, draft.recipient, draft.id))
        self._feed.publish(Stored(message))
        self._feed.publish(StateChanged(sender, draft.id, MessageState.STORED, now, conn))
        return Outcome(draft.id, MessageState.STORED, now, message)

    async def find_inbox(self, owner: str, ids: Sequence[str]) -> list[Message]:
        inbox = self._inboxes.get(owner)
        if inbox is None:
            return []
        # An id asked for twice (an ack and a read of one message) is one match, not two.
        unique = dict.fromkeys(ids)
        return [message for message_id in unique for message in inbox.with_id(message_id)]

    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        inbox = self._inboxes.get(owner)
        if inbox is None:
            return []
        start = after or 0
        found: list[Message] = []
        if since is None or since > start:
            found = inbox.pending_after(start, since, limit)
            if since is None or len(found) == limit:
                return found
            start = since
        end = min(len(inbox.log), start + limit - len(found))
        return found + inbox.log[start:end]

    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        moves = self._moves.get(sender, [])
        start = bisect.bisect_left(moves, since, key=lambda move: move[0])
        # A message that moved twice is told once, in the place of its last move.
        latest: dict[tuple[str, str], None] = {}
        for _, recipient, mid in reversed(moves[start:]):
            latest.setdefault((recipient, mid), None)
        found = []
        for recipient, mid in reversed(latest):
            inbox = self._inboxes[recipient]
            position = inbox.by_key[(sender, mid)]
            found.append(
                StateChanged(sender, mid, inbox.get(position).state, inbox.at[position - 1])
            )
        return found

    async def record(self, transitions: Sequence[Transition]) -> None:
        for transition in transitions:
            self._record_one(transition)

    def _record_one(self, transition: Transition) -> None:
        inbox = self._inboxes.get(transition.recipient)
        position = inbox.by_key.get((transition.sender, transition.id)) if inbox else None
        if inbox is None or position is None:
            return
        message = inbox.get(position)
        if not advances(message.state, transition.state):
            return
        now = utcnow()
        inbox.log[position - 1] = message.moved_to(transition.state)
        inbox.at[position - 1] = now
        if message.state in PENDING and transition.state not in PENDING:
            inbox.left_pending()
        self._moves[message.sender].append((now, message.recipient, message.id))
        self._feed.publish(StateChanged(message.sender, message.id, transition.state, now))


class MemoryFeed:
    """The in-process feed of the memory engine: its store reports every write here."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[FeedEvent] = asyncio.Queue()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def problem(self) -> str | None:
        return None if self._running else "the in-process feed is not running"

    def publish(self, event: FeedEvent) -> None:
        """Queue an event, in the order the store made it."""
        self._events.put_nowait(event)

    async def run(self, sink: Sink) -> None:
        self._running = True
        try:
            while True:
                # get() does not yield while events are queued. Yielding after a
                # turn's worth lets the writers drain their queues during a burst,
                # not after it; yielding after each event was a turn of the loop
                # per event, several per message.
                turn = [await self._events.get()]
                while len(turn) < _EVENTS_PER_TURN and not self._events.empty():
                    turn.append(self._events.get_nowait())
                for event in turn:
                    try:
                        sink(event)
                    except Exception:
                        # One event the hub cannot route must not stop delivery of the rest.
                        log.exception(
                            "feed_event_failed", extra={"event_type": type(event).__name__}
                        )
                await asyncio.sleep(0)
        finally:
            self._running = False

    def watch(self, email: str) -> None:
        pass

    def unwatch(self, email: str) -> None:
        pass

    async def ready(self, email: str) -> None:
        pass


class MemoryPresence:
    """Presence within this one process."""

    def __init__(self) -> None:
        self._online: set[str] = set()

    async def is_online(self, email: str) -> bool:
        return email in self._online

    async def set(self, email: str, online: bool) -> None:
        if online:
            self._online.add(email)
        else:
            self._online.discard(email)

    async def refresh(self, emails: Sequence[str]) -> None:
        self._online.update(emails)


def memory_engine() -> Engine:
    """A fresh embedded engine."""
    feed = MemoryFeed()
    return Engine("memory", MemoryStore(feed), feed, MemoryPresence())
