"""The embedded engine's store: users and messages in this process's memory, and their purge."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from tidings.engine.memory.feed import MemoryFeed
from tidings.engine.memory.inbox import Inbox
from tidings.models import (
    Draft,
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
from tidings.states import FINISHED, PENDING, MessageState, advances

log = logging.getLogger("tidings.engine.memory")

# Longest wait between two purges of expired messages; MongoDB's TTL monitor
# runs once a minute too. A pass costs only what it removes, so a short
# retention is purged as often as it asks for.
PURGE_INTERVAL = 60.0

Clock = Callable[[], datetime]


class MemoryStore:
    """``Store`` in this process's memory; every write is reported to ``publish``.

    With a ``retention``, a delivered or read message is let go once that many
    seconds have passed since it reached that state (by ``clock``), by a purge
    that ``start`` begins and ``close`` ends; messages not yet delivered stay.
    """

    def __init__(
        self, feed: MemoryFeed, retention: float | None = None, clock: Clock = utcnow
    ) -> None:
        self._feed = feed
        self._retention = None if retention is None else timedelta(seconds=retention)
        self._clock = clock
        self._users: dict[str, User] = {}
        self._inboxes: dict[str, Inbox] = defaultdict(Inbox)
        # (sender, id) -> recipient: the sender's side of each message.
        self._receipts: dict[tuple[str, str], str] = {}
        # sender -> (recipient, id) -> when its state last moved, in the order of
        # those moves: a move takes the key out and puts it back at the end.
        self._moves: dict[str, dict[tuple[str, str], datetime]] = defaultdict(dict)
        # (finished at, recipient, sender, id) of every message that reached
        # delivered or read: the next to expire on top, so a purge pass costs
        # what it removes. A read after a delivery adds a second entry; the
        # first is skipped when it comes up.
        self._finished: list[tuple[datetime, str, str, str]] = []
        self._purging: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._retention is not None and self._purging is None:
            interval = min(self._retention.total_seconds(), PURGE_INTERVAL)
            self._purging = asyncio.create_task(self._purge_every(interval), name="memory-purge")

    async def close(self) -> None:
        task, self._purging = self._purging, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _purge_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.purge()
            except Exception:
                # A purge that failed once must not stop the next ones.
                log.exception("purge_failed")

    def purge(self) -> int:
        """Let go of every finished message whose retention has run out; how many went."""
        if self._retention is None:
            return 0
        cutoff = self._clock() - self._retention
        count = 0
        while self._finished and self._finished[0][0] <= cutoff:
            finished, recipient, sender, mid = heapq.heappop(self._finished)
            inbox = self._inboxes.get(recipient)
            position = inbox.by_key.get((sender, mid)) if inbox is not None else None
            if inbox is None or position is None or inbox.at[position] != finished:
                continue  # gone already, or read since: a later entry stands for it
            message = inbox.get(position)
            if message.state in PENDING:
                continue  # never: only finished messages have entries; owed ones stay
            inbox.remove(message)
            self._receipts.pop((sender, mid), None)
            self._moves[sender].pop((recipient, mid), None)
            count += 1
        return count

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
            # is the first message's current state. (Once its retention has run
            # out, the id is free again and names a new message.)
            inbox = self._inboxes[recipient]
            position = inbox.by_key[(sender, draft.id)]
            message = inbox.get(position)
            return Outcome(draft.id, message.state, inbox.at[position])
        inbox = self._inboxes[draft.recipient]
        now = self._clock()
        position = inbox.next_position()
        message = Message(
            position, draft.id, sender, draft.recipient, draft.content, now, MessageState.STORED
        )
        inbox.add(message, now)
        self._receipts[(sender, draft.id)] = draft.recipient
        self._moves[sender][(draft.recipient, draft.id)] = now
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
        return found + inbox.after(start, limit - len(found))

    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        # Newest move first, back to ``since``: each message once, in the place
        # of its last move, and only as many steps as the answer holds.
        found = []
        for (recipient, mid), moved in reversed(self._moves.get(sender, {}).items()):
            if moved < since:
                break
            inbox = self._inboxes[recipient]
            position = inbox.by_key[(sender, mid)]
            found.append(StateChanged(sender, mid, inbox.get(position).state, inbox.at[position]))
        found.reverse()
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
        now = self._clock()
        inbox.messages[position] = message.moved_to(transition.state)
        inbox.at[position] = now
        if message.state in PENDING and transition.state not in PENDING:
            inbox.left_pending()
        if self._retention is not None and transition.state in FINISHED:
            entry = (now, message.recipient, message.sender, message.id)
            heapq.heappush(self._finished, entry)
        moves = self._moves[message.sender]
        moves.pop((message.recipient, message.id), None)
        moves[(message.recipient, message.id)] = now
        self._feed.publish(StateChanged(message.sender, message.id, transition.state, now))
