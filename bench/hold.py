"""Holding many idle connections: load-generator worker processes and their pool.

One Python process on one core cannot open 15,000 WebSocket connections
quickly, nor hold them under one file limit comfortably, so M5 spreads them
over a few workers, all pinned to the load-generator core. A worker
(``python -m bench.hold``) takes one JSON command a line on stdin and answers
one JSON line on stdout:

- ``{"cmd": "open", "count": N, "budget": S}``: open N more connections (in
  ``tidings`` mode each identifies as a fresh e-mail; in ``echo`` mode each
  round-trips one frame), giving up on new ones after S seconds;
- ``{"cmd": "check", "sample": K, "budget": S}``: how many are still open, and
  whether K of them, spread over all, still answer (``#ping``, or an echo);
- ``{"cmd": "close"}``: close them all and exit. End of input does the same,
  and a worker never lives longer than ``MAX_LIFETIME``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException
from websockets.protocol import State

from bench.proc import LOAD_CORE, pinned, raise_nofile_limit
from bench.servers import REPO, base_env

MAX_LIFETIME = 1800.0
OPEN_CONCURRENCY = 64
FRAME_TIMEOUT = 30.0


class Worker:
    """The connections of one worker process."""

    def __init__(self, url: str, mode: str, tag: str) -> None:
        self.url = url
        self.mode = mode
        self.tag = tag
        self.conns: list[ClientConnection] = []
        self.errors: dict[str, int] = {}
        self._serial = 0

    async def _one(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            self.errors["budget"] = self.errors.get("budget", 0) + 1
            return
        self._serial += 1
        serial = self._serial
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                ws = await connect(
                    self.url,
                    compression=None,
                    max_size=2**24,
                    ping_interval=None,
                    close_timeout=2,
                    proxy=None,
                )
                try:
                    if self.mode == "tidings":
                        email = f"{self.tag}-{serial}@bench.test"
                        await ws.send(orjson.dumps({"type": "#email", "email": email}).decode())
                        await _expect(ws, "#email")
                    else:
                        await ws.send('{"type":"#ping","ts":0}')
                        await ws.recv()
                except BaseException:
                    await ws.close()
                    raise
            self.conns.append(ws)
        except (OSError, TimeoutError, WebSocketException, LookupError) as exc:
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1

    async def open(self, count: int, budget: float) -> dict[str, Any]:
        deadline = time.monotonic() + budget
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one() -> None:
            async with gate:
                await self._one(deadline)

        before = len(self.conns)
        await asyncio.gather(*(one() for _ in range(count)))
        opened = len(self.conns) - before
        return {
            "open": len(self.conns),
            "opened": opened,
            "timed_out": opened < count,
            "errors": self.errors,
        }

    async def check(self, sample: int, budget: float) -> dict[str, Any]:
        alive = [ws for ws in self.conns if ws.protocol.state is State.OPEN]
        step = max(1, len(alive) // max(1, sample))
        chosen = alive[::step][:sample]
        ok = 0

        async def probe(ws: ClientConnection) -> bool:
            with contextlib.suppress(OSError, TimeoutError, WebSocketException, LookupError):
                async with asyncio.timeout(budget):
                    await ws.send('{"type":"#ping","ts":1}')
                    if self.mode == "tidings":
                        await _expect(ws, "#pong")
                    else:
                        await ws.recv()
                    return True
            return False

        ok = sum(await asyncio.gather(*(probe(ws) for ws in chosen)))
        return {"open": len(alive), "checked": len(chosen), "ok": ok}

    async def close(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(OPEN_CONCURRENCY * 4)

        async def one(ws: ClientConnection) -> None:
            async with gate:
                with contextlib.suppress(OSError, TimeoutError, WebSocketException):
                    await ws.close()

        await asyncio.gather(*(one(ws) for ws in self.conns))
        closed = len(self.conns)
        self.conns.clear()
        return {"closed": closed}


async def _expect(ws: ClientConnection, kind: str) -> None:
    """Read frames until one of type ``kind``; an error frame is a failure."""
    async with asyncio.timeout(FRAME_TIMEOUT):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame.get("type") == kind:
                return
            if frame.get("type") == "error":
                raise LookupError(str(frame.get("code")))


async def _serve(url: str, mode: str, tag: str) -> None:
    worker = Worker(url, mode, tag)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async with asyncio.timeout(MAX_LIFETIME):
            while line := await reader.readline():
                command = orjson.loads(line)
                if command["cmd"] == "open":
                    answer = await worker.open(int(command["count"]), float(command["budget"]))
                elif command["cmd"] == "check":
                    answer = await worker.check(int(command["sample"]), float(command["budget"]))
                else:
                    answer = await worker.close()
                sys.stdout.write(orjson.dumps(answer).decode() + "\n")
                sys.stdout.flush()
                if command["cmd"] == "close":
                    return
    finally:
        await worker.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.hold --url URL --mode tidings|echo --tag TAG``."""
    parser = argparse.ArgumentParser(prog="python -m bench.hold")
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["tidings", "echo"], required=True)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    asyncio.run(_serve(args.url, args.mode, args.tag))
    return 0


class HoldPool:
    """The harness's side: a few workers on the load-generator core, used as one."""

    def __init__(self, url: str, mode: str, tag: str, workers: int) -> None:
        self.url = url
        self.mode = mode
        self.tag = tag
        self.size = max(1, workers)
        self._workers: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for index in range(self.size):
            argv = [
                sys.executable,
                "-m",
                "bench.hold",
                "--url",
                self.url,
                "--mode",
                self.mode,
                "--tag",
                f"{self.tag}w{index}",
            ]
            self._workers.append(
                await asyncio.create_subprocess_exec(
                    *pinned(argv, LOAD_CORE),
                    cwd=REPO,
                    env=base_env(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )

    async def _ask(
        self, worker: asyncio.subprocess.Process, command: dict[str, Any], budget: float
    ) -> dict[str, Any]:
        assert worker.stdin is not None
        assert worker.stdout is not None
        worker.stdin.write(orjson.dumps(command) + b"\n")
        await worker.stdin.drain()
        async with asyncio.timeout(budget):
            line = await worker.stdout.readline()
        if not line:
            raise RuntimeError(f"hold worker exited with {worker.returncode}")
        answer: dict[str, Any] = orjson.loads(line)
        return answer

    async def open(self, count: int, budget: float) -> dict[str, Any]:
        """Open ``count`` more connections spread over the workers; totals."""
        shares = [
            count // self.size + (1 if i < count % self.size else 0) for i in range(self.size)
        ]
        # The workers' own budget ends first; the margin is for their answer.
        answers = await asyncio.gather(
            *(
                self._ask(w, {"cmd": "open", "count": n, "budget": budget}, budget + 60)
                for w, n in zip(self._workers, shares, strict=True)
            )
        )
        errors: dict[str, int] = {}
        for answer in answers:
            for name, n in answer["errors"].items():
                errors[name] = errors.get(name, 0) + n
        return {
            "open": sum(a["open"] for a in answers),
            "opened": sum(a["opened"] for a in answers),
            "timed_out": any(a["timed_out"] for a in answers),
            "errors": errors,
        }

    async def check(self, sample: int, budget: float = 30.0) -> dict[str, Any]:
        """Connections still open, and how many of a sample still answer."""
        each = max(1, sample // self.size)
        answers = await asyncio.gather(
            *(
                self._ask(w, {"cmd": "check", "sample": each, "budget": budget}, budget + 30)
                for w in self._workers
            )
        )
        return {k: sum(a[k] for a in answers) for k in ("open", "checked", "ok")}

    async def close(self) -> None:
        """Close every connection and end the workers (killed if they do not end)."""
        for worker in self._workers:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                await self._ask(worker, {"cmd": "close"}, 60)
        for worker in self._workers:
            try:
                await asyncio.wait_for(worker.wait(), 10)
            except TimeoutError:
                worker.kill()
                await worker.wait()
        self._workers.clear()


if __name__ == "__main__":
    sys.exit(main())
