"""What each connection of a ``bench.blast`` worker does: send, acknowledge or echo.

Every handler parses only the frames it must and answers at once; the
connection (``bench.wire``) writes all of one read's answers in one call.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from bench import wire

CONTENT = b"hello from the load generator"
STORED_OR_LATER = frozenset({"stored", "sent", "delivered", "read"})
ACKED = frozenset({"delivered", "read"})


def message_prefix(to: str) -> bytes:
    """The bytes of a ``message`` frame up to its id's number."""
    return b'{"type":"message","to":"' + to.encode() + b'","content":"' + CONTENT + b'","id":"m'


class Tally:
    """What every connection of this worker reached, with the time of the last of each."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.stored = self.received = self.acked = self.counted = self.failed = 0
        self.duplicates = 0
        self.errors: dict[str, int] = {}
        self.last: dict[str, float] = {}
        # Per message: seen stored by its sender, read by its recipient.
        self._halves: dict[tuple[str, str], int] = {}
        self.done = asyncio.get_running_loop().create_future()

    def half(self, key: tuple[str, str], bit: int) -> None:
        seen = self._halves.get(key, 0)
        if seen & bit:
            return
        self._halves[key] = seen | bit
        if seen:
            self.counted += 1
            self.last["counted"] = time.monotonic()

    def mark(self, what: str) -> None:
        self.last[what] = time.monotonic()

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def check(self, settled: int) -> None:
        if settled + self.failed >= self.expected and not self.done.done():
            self.done.set_result(None)


class Sender:
    """Sends its ``messages`` through a window; follows their states."""

    def __init__(
        self, conn: wire.Conn, email: str, to: str, tally: Tally, messages: int, window: int
    ) -> None:
        self.conn, self.email, self.tally = conn, email, tally
        self.messages, self.window = messages, window
        self.prefix = message_prefix(to)
        self.sent = 0
        self.in_flight: set[str] = set()
        self.acked: set[str] = set()

    def pump(self) -> None:
        while self.sent < self.messages and len(self.in_flight) < self.window:
            number = str(self.sent)
            self.sent += 1
            self.in_flight.add("m" + number)
            self.conn.send(wire.client_frame(self.prefix + number.encode() + b'"}'))

    def on_text(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        kind = frame.get("type")
        tally = self.tally
        if kind == "state":
            mid, state = frame.get("id"), frame.get("state")
            if state in STORED_OR_LATER:
                if mid in self.in_flight:
                    self.in_flight.discard(mid)
                    tally.stored += 1
                    tally.mark("stored")
                    tally.half((self.email, mid), 1)
                    self.pump()
                if state in ACKED and mid not in self.acked:
                    self.acked.add(mid)
                    tally.acked += 1
                    tally.mark("acked")
                    tally.check(tally.acked)
            elif state == "failed" and mid in self.in_flight:
                self._fail(mid, str(frame.get("code")))
        elif kind == "error":
            tally.error(str(frame.get("code")))
            ref = frame.get("ref")
            if isinstance(ref, str) and ref in self.in_flight:
                self._fail(ref, str(frame.get("code")))

    def _fail(self, mid: str, code: str) -> None:
        self.in_flight.discard(mid)
        self.tally.failed += 1
        self.tally.error(f"failed:{code}")
        self.tally.check(self.tally.acked)
        self.pump()


class Recipient:
    """Acks every message it reads."""

    def __init__(self, conn: wire.Conn, tally: Tally) -> None:
        self.conn, self.tally = conn, tally
        self.seen: set[tuple[str, str]] = set()

    def on_text(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        if frame.get("type") != "message":
            return
        key = (str(frame.get("from")), str(frame.get("id")))
        if key in self.seen:
            self.tally.duplicates += 1
        else:
            self.seen.add(key)
            self.tally.received += 1
            self.tally.half(key, 2)
        self.conn.send(
            wire.client_frame(orjson.dumps({"type": "ack", "id": key[1], "from": key[0]}))
        )


class Echoer:
    """Round-trips ``messages`` frames through a window; counts the echoes."""

    def __init__(self, conn: wire.Conn, tally: Tally, messages: int, window: int) -> None:
        self.conn, self.tally = conn, tally
        self.messages, self.window = messages, window
        self.frame = wire.client_frame(message_prefix("echo@bench.test") + b'0"}')
        self.sent = self.done = 0

    def pump(self) -> None:
        while self.sent < self.messages and self.sent - self.done < self.window:
            self.sent += 1
            self.conn.send(self.frame)

    def on_text(self, payload: bytes) -> None:
        self.done += 1
        tally = self.tally
        tally.acked += 1
        tally.mark("acked")
        self.pump()
        tally.check(tally.acked)
