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
from bench.roles import Echoer, Recipient, Sender, Tally

IDENTIFY_TIMEOUT = 30.0


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
