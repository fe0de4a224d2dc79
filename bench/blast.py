"""A load-generator worker process on ``bench.wire``: echo round trips, or Tidings pairs.

``python -m bench.blast`` reads one JSON command a line on stdin and answers
one JSON line on stdout:

- ``{"cmd": "prepare", "mode": "echo"|"pairs", "url": U, "count": N,
  "messages": M, "window": W, "tag": T}``: open N echo connections, or N
  sender→recipient pairs identified as fresh e-mails (recipients first);
  answers ``{"ready": N}`` or ``{"error": ...}``;
- ``{"cmd": "go", "budget": S}``: every connection (every sender) sends M
  frames with at most W in flight; answers what was reached, with
  ``time.monotonic()`` readings (one clock for every process of the machine)
  and the CPU seconds this process spent. Then the worker exits.

Pairs: a message is in flight from its send to its sender's ``stored`` (or a
later state); every recipient acks every message. A ``failed`` state or an
error frame settles a message as failed; nothing is sent again.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from bench import wire
from bench.proc import raise_nofile_limit

CONTENT = b"hello from the load generator"
STORED_OR_LATER = frozenset({"stored", "sent", "delivered", "read"})
ACKED = frozenset({"delivered", "read"})
IDENTIFY_TIMEOUT = 30.0


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


async def identify(conn: wire.Conn, email: str) -> None:
    """Send ``#email`` and wait for its reply."""
    reply = asyncio.get_running_loop().create_future()

    def waiting(payload: bytes) -> None:
        frame = orjson.loads(payload)
        if frame.get("type") in ("#email", "error") and not reply.done():
            reply.set_result(frame)

    conn.on_text = waiting
    conn.send(wire.client_frame(orjson.dumps({"type": "#email", "email": email})))
    async with asyncio.timeout(IDENTIFY_TIMEOUT):
        frame = await reply
    if frame.get("type") != "#email":
        raise wire.WireError(f"{email}: identify refused: {frame}")


class Job:
    """One worker's connections and what they reach."""

    def __init__(self, command: dict[str, Any]) -> None:
        self.command = command
        self.conns: list[wire.Conn] = []
        self.starters: list[Sender | Echoer] = []
        self.tally = Tally(int(command["count"]) * int(command["messages"]))

    async def prepare(self) -> int:
        c = self.command
        url, count, tag = str(c["url"]), int(c["count"]), str(c["tag"])
        messages, window = int(c["messages"]), int(c["window"])
        if c["mode"] == "echo":
            for _ in range(count):
                conn = await wire.connect(url)
                self.conns.append(conn)
                echoer = Echoer(conn, self.tally, messages, window)
                conn.on_text = echoer.on_text
                self.starters.append(echoer)
            return count
        for i in range(count):
            sender_email, to = f"{tag}-s{i}@bench.test", f"{tag}-r{i}@bench.test"
            receiving = await wire.connect(url)
            self.conns.append(receiving)
            await identify(receiving, to)
            receiving.on_text = Recipient(receiving, self.tally).on_text
            sending = await wire.connect(url)
            self.conns.append(sending)
            await identify(sending, sender_email)
            sender = Sender(sending, sender_email, to, self.tally, messages, window)
            sending.on_text = sender.on_text
            self.starters.append(sender)
        return count

    async def go(self, budget: float) -> dict[str, Any]:
        tally = self.tally
        cpu0 = time.process_time()
        started = time.monotonic()
        for starter in self.starters:
            starter.pump()
        try:
            async with asyncio.timeout(budget):
                await tally.done
            timed_out = False
        except TimeoutError:
            timed_out = True
        ended = time.monotonic()
        closed = sum(1 for conn in self.conns if conn.closed.done())
        return {
            "expected": tally.expected,
            "stored": tally.stored,
            "received": tally.received,
            "acked": tally.acked,
            "counted": tally.counted,
            "failed": tally.failed,
            "duplicates": tally.duplicates,
            "errors": tally.errors,
            "started": started,
            "ended": ended,
            "last": tally.last,
            "timed_out": timed_out,
            "closed_early": closed,
            "cpu_s": time.process_time() - cpu0,
        }

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    job: Job | None = None
    try:
        while line := await reader.readline():
            command = orjson.loads(line)
            answer: dict[str, Any]
            try:
                if command["cmd"] == "prepare":
                    job = Job(command)
                    answer = {"ready": await job.prepare()}
                elif job is not None:
                    answer = await job.go(float(command["budget"]))
                else:
                    answer = {"error": "go before prepare"}
            except (OSError, TimeoutError, wire.WireError) as exc:
                answer = {"error": repr(exc)}
            sys.stdout.write(orjson.dumps(answer).decode() + "\n")
            sys.stdout.flush()
            if command["cmd"] != "prepare" or "error" in answer:
                return
    finally:
        if job is not None:
            job.close()
            # Let the close frames leave before the process does.
            await asyncio.sleep(0.1)


def main() -> int:
    """Serve commands on stdin until ``go`` has been answered."""
    raise_nofile_limit()
    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
