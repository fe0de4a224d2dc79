"""Model-based: random users connect, send, resend, ack, read and leave; a model says what
each must see.

A Hypothesis state machine drives a real server (embedded and nx-27017) with
the synchronous WebSocket client. Steps run one after another, and the model
knows after each one what the store holds:

- every message that reached ``stored``, in the order it was stored, per recipient;
- which were acknowledged or read (each ack is followed by a sentinel, and
  frames are handled in order, so its pong means the ack is durable);
- which messages each open connection must still receive live, in order.

Each step, and the teardown, ends with a sentinel on every open connection: a
``#ping`` with a ``ts`` of its own, and every frame up to its ``#pong`` checked
against the model. So a frame that should not have come is caught by the step
that caused it, not by a wait that happened to be long enough.

Invariants, checked on every frame that arrives:

- a connection's message frames are exactly its backlog (every message not
  yet delivered, plus with ``since`` every later one), then the messages
  stored for its user while it is open, in stored order: nothing lost, no
  duplicate, no message of anyone else, one order;
- a sender's states move forward only, and ``delivered``/``read`` come only
  after the recipient sent ``ack``/``read``; and they do come: once an ``ack``
  or ``read`` moves a message forward, the sender's connection, if it has one,
  must see the new state within ``TIMEOUT``;
- the only other frames are the ``#email`` answer, once, and the ``#pong`` of
  the sentinel in flight.

``make model`` runs it for long (``TIDINGS_MODEL_EXAMPLES``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from websockets.sync.client import ClientConnection, connect

from tests.asyncapi_check import server_frame
from tests.helpers import TIMEOUT, ThreadedServer
from tests.mongo import NxServer
from tidings.config import Settings

pytestmark = pytest.mark.e2e

USERS = 3
RANK = {"received": 0, "stored": 1, "sent": 2, "delivered": 3, "read": 4}
EXAMPLES = int(os.environ.get("TIDINGS_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("TIDINGS_MODEL_STEPS", "25"))

Key = tuple[str, str]  # (sender, id)


@dataclass
class Stored:
    """A message the server answered ``stored`` for."""

    sender: str
    id: str
    recipient: str
    done: str | None = None  # "delivered" or "read", once the recipient said so


@dataclass
class Connection:
    """One open connection and what it must receive next."""

    ws: ClientConnection
    email: str
    expected: deque[Key] = field(default_factory=deque)
    states: dict[str, str] = field(default_factory=dict)  # this user's sent messages
    identified: bool = False
    pinged: str | None = None  # the ts of the sentinel in flight


class Protocol(RuleBasedStateMachine):
    """Users and their connections against one server; see the module docstring."""

    url = ""

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.emails = [f"u{n}-{run}@example.com" for n in range(USERS)]
        self.known: set[str] = set()  # identified at least once: a user record exists
        self.stored: list[Stored] = []  # in stored order, every recipient
        self.received: dict[str, list[Key]] = {email: [] for email in self.emails}
        self.conns: dict[str, Connection] = {}
        self.serial = itertools.count()
        self.sentinels = itertools.count()
        self.sockets = contextlib.ExitStack()
        # Every open connection has been read up to a sentinel since the last frame
        # sent: the teardown may check them once more (not after a failed step).
        self.settled = True

    # --- frames ------------------------------------------------------------------------

    def take(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Check one frame against the model."""
        if frame["type"] == "message":
            key = (frame["from"], frame["id"])
            assert frame["to"] == conn.email, frame
            assert conn.expected, f"{conn.email} got {key}, expected nothing"
            assert key == conn.expected.popleft(), (key, list(conn.expected))
            if key not in self.received[conn.email]:
                self.received[conn.email].append(key)
        elif frame["type"] == "state":
            message = self.find((conn.email, frame["id"]))
            state = frame["state"]
            if state in ("received", "failed"):
                # The answer to a frame (a resend is received again), not a recorded
                # state; failed only for what was not stored.
                assert state == "received" or message is None, frame
                return
            earlier = conn.states.get(frame["id"], "received")
            assert RANK[state] >= RANK[earlier], (frame, earlier)
            if RANK[state] >= RANK["delivered"]:
                assert message is not None, frame
                assert message.done is not None, frame
                assert RANK[state] <= RANK[message.done], (frame, message.done)
            conn.states[frame["id"]] = state
        elif frame["type"] == "#email":
            assert not conn.identified, frame
            conn.identified = True
        else:
            assert frame["type"] == "#pong", frame
            assert conn.pinged is not None, frame
            assert frame["ts"] == conn.pinged, (frame, conn.pinged)
            conn.pinged = None

    def send_frame(self, conn: Connection, frame: dict[str, Any]) -> None:
        self.settled = False
        conn.ws.send(json.dumps(frame))

    def recv(self, conn: Connection, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = server_frame(conn.ws.recv(timeout=timeout))
        self.take(conn, frame)
        return frame

    def until(self, conn: Connection, done: Any) -> dict[str, Any]:
        while True:
            frame = self.recv(conn)
            if done(frame):
                return frame

    def find(self, key: Key) -> Stored | None:
        return next((m for m in self.stored if (m.sender, m.id) == key), None)

    def sentinel(self, conn: Connection) -> None:
        """Ping ``conn`` and check every frame up to its pong: all that was due has come."""
        ts = f"sentinel-{next(self.sentinels)}"
        conn.pinged = ts
        self.send_frame(conn, {"type": "#ping", "ts": ts})
        self.until(conn, lambda f: f["type"] == "#pong")
        assert not conn.expected, f"{conn.email} still expects {list(conn.expected)}"

    def settle(self) -> None:
        """A sentinel on every open connection."""
        for conn in self.conns.values():
            self.sentinel(conn)
        self.settled = True

    def reaches_sender(self, message: Stored, state: str) -> None:
        """The sender's connection, if it has one, sees ``state`` within ``TIMEOUT``."""
        conn = self.conns.get(message.sender)
        if conn is None:
            return
        deadline = time.monotonic() + TIMEOUT
        while RANK[conn.states.get(message.id, "received")] < RANK[state]:
            # Every frame on the way is checked; the step's sentinel follows.
            remaining = deadline - time.monotonic()
            try:
                self.recv(conn, timeout=max(remaining, 0))
            except TimeoutError:
                raise AssertionError(
                    f"{state} of {message.id} did not reach its sender {conn.email} "
                    f"within {TIMEOUT} s (it saw {conn.states.get(message.id)})"
                ) from None

    # --- rules -------------------------------------------------------------------------

    @rule(user=st.integers(0, USERS - 1), with_since=st.booleans())
    def connect(self, user: int, with_since: bool) -> None:
        email = self.emails[user]
        if email in self.conns:
            return
        frame: dict[str, Any] = {"type": "#email", "email": email}
        mine = [m for m in self.stored if m.recipient == email]
        since = None
        if with_since and self.received[email]:
            since = self.received[email][0]
            # An id two senders used would be ambiguous; the model sends unique ids.
            frame["since"] = since[1]
        conn = Connection(
            self.sockets.enter_context(connect(self.url, open_timeout=TIMEOUT)), email
        )
        self.conns[email] = conn
        after = False
        for message in mine:
            if message.done is None or after:
                conn.expected.append((message.sender, message.id))
            after = after or (since is not None and (message.sender, message.id) == since)
        self.send_frame(conn, frame)
        self.until(conn, lambda f: f["type"] == "#email")
        self.known.add(email)
        event(f"identify, backlog of {len(conn.expected)}" + (" since" if since else ""))
        while conn.expected:  # the backlog, in full
            self.recv(conn)

    def connected(self, pick: int) -> Connection:
        return self.conns[sorted(self.conns)[pick % len(self.conns)]]

    @precondition(lambda self: self.conns)
    @rule(pick=st.integers(0, USERS - 1))
    def disconnect(self, pick: int) -> None:
        conn = self.conns.pop(self.connected(pick).email)
        conn.ws.close()
        event("disconnect")

    @precondition(lambda self: self.conns)
    @rule(pick=st.integers(0, USERS - 1), to=st.integers(0, USERS - 1))
    def send(self, pick: int, to: int) -> None:
        conn = self.connected(pick)
        recipient = self.emails[to]
        mid = f"m{next(self.serial)}"
        receiver = self.conns.get(recipient)
        if receiver is not None:  # expected before it is sent: it may be its own sender
            receiver.expected.append((conn.email, mid))
            self.stored.append(Stored(conn.email, mid, recipient))
        self.send_frame(conn, {"type": "message", "to": recipient, "content": mid, "id": mid})
        answer = self.until(
            conn, lambda f: f.get("id") == mid and f["state"] in ("stored", "failed")
        )
        if recipient not in self.known:
            assert (answer["state"], answer["code"]) == ("failed", "not_found"), answer
            event("send to an unknown user")
            return
        assert answer["state"] == "stored", answer
        event("send, recipient online" if receiver else "send, recipient offline")
        if receiver is None:
            self.stored.append(Stored(conn.email, mid, recipient))
        else:
            while receiver.expected:  # it must arrive, live
                self.recv(receiver)

    @precondition(lambda self: self.conns and self.stored)
    @rule(sender=st.integers(0, USERS - 1), pick=st.integers(0, 10**6))
    def resend(self, sender: int, pick: int) -> None:
        conn = self.connected(sender)
        mine = [m for m in self.stored if m.sender == conn.email]
        if not mine:
            return
        message = mine[pick % len(mine)]
        event("resend")
        frame = {"type": "message", "to": message.recipient, "content": "x", "id": message.id}
        self.send_frame(conn, frame)
        # Received, then the current state: nothing is stored again, which the
        # recipients' expected queues check on every later frame.
        self.until(conn, lambda f: f.get("id") == message.id and f["state"] != "received")

    @precondition(lambda self: self.conns and self.stored)
    @rule(
        user=st.integers(0, USERS - 1),
        pick=st.integers(0, 10**6),
        kind=st.sampled_from(["ack", "read"]),
    )
    def acknowledge(self, user: int, pick: int, kind: str) -> None:
        conn = self.connected(user)
        email = conn.email
        if not self.received[email]:
            return
        event(kind)
        sender, mid = self.received[email][pick % len(self.received[email])]
        message = self.find((sender, mid))
        assert message is not None
        state = "delivered" if kind == "ack" else "read"
        moves = message.done is None or RANK[state] > RANK[message.done]
        if moves:
            message.done = state  # before it is sent: its state may come back at once
        self.send_frame(conn, {"type": kind, "id": mid, "from": sender})
        self.sentinel(conn)  # the ack is handled, so durable
        if moves:
            self.reaches_sender(message, state)

    @invariant()
    def every_connection_settles(self) -> None:
        self.settle()

    def teardown(self) -> None:
        with self.sockets:
            if self.settled:
                self.settle()


def run_machine(url: str) -> None:
    Protocol.url = url
    machine = Protocol.TestCase
    machine.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine().runTest()


def test_the_protocol_keeps_its_guarantees_embedded() -> None:
    with ThreadedServer(Settings(dev=True, rate_limit=10_000, rate_burst=10_000)) as server:
        run_machine(server.url)


def test_the_protocol_keeps_its_guarantees_on_nx_27017(nx: NxServer) -> None:
    options = Settings(
        dev=True,
        rate_limit=10_000,
        rate_burst=10_000,
        mongodb_uri=nx.uri,
        database=f"model_{uuid.uuid4().hex[:8]}",
        change_stream_scope="collection",
    )
    with ThreadedServer(options) as server:
        run_machine(server.url)
