"""``make soak``: steady load and connection churn for minutes; nothing lost, nothing growing.

Tidings (through ``bench.server``) on nx-27017, whose store lives outside the
server process (the embedded store keeps every message in the server's
memory, so its RSS grows with the messages by design). For ``--minutes``:

- ``--pairs`` senders each send a message every ``1/--rate`` seconds to their
  recipient, who acknowledges each one; a send answered ``unavailable`` or cut
  with its connection is sent again with the same id, as a client must;
- every ``--rotate`` seconds each pair moves to new addresses (the old
  recipient stays until it has everything), so that users come and go and no
  collection grows through the run;
- every two seconds one recipient closes its connection and opens a new one
  (its unacknowledged messages come again in the backlog), and
  ``--churn`` short connections a second identify and leave.

Every ``--sample`` seconds the server's RSS, open descriptors and asyncio
tasks are sampled. Pass: every message that reached ``stored`` arrived, none
twice within one connection, over the last half of the run RSS and
descriptors are flat (least-squares slope times the half's length under
``RSS_GROWTH`` of the mean and ``FD_GROWTH`` descriptors), and once every
client has left, tasks and descriptors are back to what they were before the
load (what is in flight during the load grows with the database's latency). Writes
``bench/results/soak.json`` and ``docs/soak.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench import runinfo
from bench.proc import rss_kib
from bench.progress import clock
from bench.servers import NxServer, TidingsServer, stop_all

ROOT = Path(__file__).resolve().parents[1]
RSS_GROWTH = 0.05  # of the mean RSS over the last half
FD_GROWTH = 5.0
SETTLE = 120.0  # seconds after the load for what was in flight to finish
DRAIN = 60.0  # seconds a generation has to get its last messages stored and delivered
PROGRESS_EVERY = 30.0


@dataclass
class Tally:
    """What the clients saw."""

    stored: set[str] = field(default_factory=set)
    received: set[str] = field(default_factory=set)
    duplicates: int = 0  # within one connection
    churned: int = 0  # recipient reconnections
    resent: int = 0  # sends answered ``unavailable`` or cut, sent again with the same id
    generations: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # other than ``unavailable``


async def open_as(url: str, email: str) -> ClientConnection:
    ws = await connect(url, compression=None, open_timeout=10)
    await ws.send(orjson.dumps({"type": "#email", "email": email}).decode())
    while orjson.loads(await ws.recv())["type"] != "#email":
        pass
    return ws


class Pair:
    """One sender and its recipient for one generation of addresses.

    Addresses change every ``--rotate`` seconds, so that no collection grows
    through the run: nx-27017 scans a collection on every update, and a soak
    that slows the database down with the length of the run measures
    nx-27017, not Tidings. Users that come and go are also what a long run
    must not accumulate.
    """

    def __init__(self, url: str, n: int, generation: int, tally: Tally) -> None:
        self.url = url
        self.sender = f"s{n}.{generation}@soak.test"
        self.recipient = f"r{n}.{generation}@soak.test"
        self.prefix = f"s{n}g{generation}-"  # ids allow no dot
        self.tally = tally
        self.pending: dict[str, bytes] = {}  # sent, not yet seen stored
        self.stored: set[str] = set()
        self.received: set[str] = set()

    async def send(self, rate: float, until: float, stop: asyncio.Event) -> None:
        """Send every ``1/rate`` s until ``until``; resend what was not answered ``stored``.

        A send answered ``unavailable`` (outcome unknown) or caught by a closed
        connection is sent again with the same id, as a client must.
        """
        serial = itertools.count()
        deadline = until + DRAIN  # what is pending then was never stored: not counted

        def sending() -> bool:
            return not stop.is_set() and time.monotonic() < until

        def going() -> bool:
            return sending() or (bool(self.pending) and time.monotonic() < deadline)

        while going():
            try:
                ws = await open_as(self.url, self.sender)
            except (ConnectionClosed, OSError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            resend = asyncio.Queue[str]()
            for mid in self.pending:
                resend.put_nowait(mid)
            reader = asyncio.create_task(self._read_states(ws, resend))
            try:
                # Until the connection ends (then reconnect and resend) or all is done.
                while not reader.done() and going():
                    while not resend.empty():
                        mid = resend.get_nowait()
                        if mid in self.pending:
                            self.tally.resent += 1
                            await ws.send(self.pending[mid].decode())
                    if sending():
                        mid = f"{self.prefix}{next(serial)}"
                        frame = {"type": "message", "to": self.recipient, "content": "soak"}
                        self.pending[mid] = orjson.dumps({**frame, "id": mid})
                        await ws.send(self.pending[mid].decode())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), 1 / rate)
            except ConnectionClosed:
                pass
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await ws.close()

    async def _read_states(self, ws: ClientConnection, resend: asyncio.Queue[str]) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = orjson.loads(raw)
                mid = frame.get("id") or frame.get("ref")
                if frame.get("state") in ("stored", "sent", "delivered", "read"):
                    self.pending.pop(mid, None)
                    self.stored.add(mid)
                    self.tally.stored.add(mid)
                elif frame["type"] == "error" and frame.get("code") == "unavailable":
                    resend.put_nowait(mid)
                elif frame["type"] == "error":
                    self.tally.errors.append(frame)

    async def receive(self, sent: asyncio.Event, reconnect: asyncio.Event) -> None:
        """Read and acknowledge, reconnecting when told to or cut, until all stored came."""
        while not (sent.is_set() and self.stored <= self.received):
            seen: set[str] = set()
            try:
                ws = await open_as(self.url, self.recipient)
            except (ConnectionClosed, OSError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            reconnect.clear()
            try:
                while not reconnect.is_set() and not (
                    sent.is_set() and self.stored <= self.received
                ):
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    frame = orjson.loads(raw)
                    if frame["type"] == "message":
                        if frame["id"] in seen:
                            self.tally.duplicates += 1
                        seen.add(frame["id"])
                        self.received.add(frame["id"])
                        self.tally.received.add(frame["id"])
                        await ws.send(orjson.dumps({"type": "ack", "id": frame["id"]}).decode())
            except ConnectionClosed:
                pass
            finally:
                await ws.close()
            self.tally.churned += 1


async def pair(
    url: str,
    n: int,
    args: argparse.Namespace,
    tally: Tally,
    reconnect: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Generations of pair ``n`` until ``stop``; each drains while the next one starts."""
    draining: set[asyncio.Task[None]] = set()
    try:
        for generation in itertools.count():
            one = Pair(url, n, generation, tally)
            tally.generations += 1
            sent = asyncio.Event()
            # The recipient first, so that messages also arrive live.
            receiving = asyncio.create_task(one.receive(sent, reconnect))
            await one.send(args.rate, time.monotonic() + args.rotate, stop)
            sent.set()
            draining.add(receiving)
            receiving.add_done_callback(draining.discard)
            if stop.is_set():
                break
    finally:
        # Bounded: what has not arrived by then is counted as lost.
        _, late = await asyncio.wait(draining, timeout=DRAIN) if draining else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


async def churn(url: str, per_second: int, stop: asyncio.Event) -> None:
    serial = itertools.count()
    while not stop.is_set():
        for _ in range(per_second):
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                ws = await open_as(url, f"c{next(serial) % 500}@soak.test")
                await ws.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def database_sockets(pid: int, port: int) -> int:
    """The process's TCP connections to ``port``: the driver's pool, open by design."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def held(server: TidingsServer, nx: NxServer) -> int:
    """Open descriptors other than the database pool's connections."""
    return fds(server.pid) - database_sockets(server.pid, nx.port)


def _read_tasks(path: Path, remove: bool = False) -> int | None:
    if remove:
        path.unlink(missing_ok=True)
        return None
    return int(orjson.loads(path.read_bytes())["tasks"]) if path.exists() else None


async def tasks(server: TidingsServer, path: Path) -> int | None:
    """The server's asyncio tasks, as ``bench.server`` writes them on SIGUSR2."""
    await asyncio.to_thread(_read_tasks, path, True)
    server.signal(signal.SIGUSR2)
    for _ in range(40):
        if (count := await asyncio.to_thread(_read_tasks, path)) is not None:
            return count
        await asyncio.sleep(0.05)
    return None


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tasks_file = workdir / "tasks.json"
    os.environ["BENCH_TASKS_FILE"] = str(tasks_file)  # the server's environment is this one's
    async with NxServer(workdir) as nx, TidingsServer(workdir, nx.uri) as server:
        before = {
            "fds": fds(server.pid),
            "fds_not_database": held(server, nx),
            "tasks": await tasks(server, tasks_file),
        }
        stop = asyncio.Event()
        tally = Tally()
        reconnects = [asyncio.Event() for _ in range(args.pairs)]
        pairs = [
            asyncio.create_task(pair(server.url, n, args, tally, reconnects[n], stop))
            for n in range(args.pairs)
        ]
        churner = asyncio.create_task(churn(server.url, args.churn, stop))
        samples: list[dict[str, float | None]] = []
        started = time.monotonic()
        next_churn = started + 2
        next_report = started + PROGRESS_EVERY
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            samples.append(
                {
                    "t": elapsed,
                    "rss_kib": rss_kib(server.pid),
                    "fds": fds(server.pid),
                    "tasks": await tasks(server, tasks_file),
                }
            )
            if time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY
                print(_progress(elapsed, args.minutes * 60, tally, samples[-1]), flush=True)
            while time.monotonic() >= next_churn:
                reconnects[int(next_churn) % args.pairs].set()
                next_churn += 2
            await asyncio.sleep(min(args.sample, max(0.0, next_churn - time.monotonic())))
        stop.set()
        print(
            f"[soak] load stopped; draining (up to {clock(DRAIN)}), then up to "
            f"{clock(SETTLE)} for what was in flight to finish",
            flush=True,
        )
        # Each pair drains its last generation (bounded) before it returns.
        await asyncio.gather(*pairs, churner)
        # Once every client is gone, what the load left behind: work still in
        # flight (writes queued behind a database that slowed) may take a while
        # to finish; what is still there after SETTLE seconds is not in flight.
        left = time.monotonic()
        while True:
            after: dict[str, Any] = {
                "fds": fds(server.pid),
                "fds_not_database": held(server, nx),
                "tasks": await tasks(server, tasks_file),
            }
            settled = (after["tasks"] or 0) <= (before["tasks"] or 0) and (
                after["fds_not_database"] <= before["fds_not_database"]
            )
            if settled or time.monotonic() - left > SETTLE:
                break
            await asyncio.sleep(1)
        after["seconds_after_the_clients_left"] = round(time.monotonic() - left, 1)
    return {"samples": samples, "tally": tally, "before": before, "after": after}


def _progress(elapsed: float, total: float, tally: Tally, sample: dict[str, Any]) -> str:
    rss = sample.get("rss_kib")
    return (
        f"[soak] {clock(elapsed)} of {clock(total)}: {len(tally.stored):,} messages stored, "
        f"{len(tally.received):,} received ({len(tally.received) / max(elapsed, 1e-9):.1f}/s), "
        f"{tally.churned} reconnects, {tally.generations} generations"
        + (f", server RSS {rss / 1024:.0f} MiB" if rss else "")
        + f"; {clock(total - elapsed)} of load left, then up to {clock(DRAIN + SETTLE)} draining"
    )


def judge(run: dict[str, Any], minutes: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = run["samples"]
    tally: Tally = run["tally"]
    before, after = run["before"], run["after"]
    half = [s for s in samples if s["t"] >= minutes * 30]
    rss = [(s["t"], float(s["rss_kib"])) for s in half if s["rss_kib"] is not None]
    fd = [(s["t"], float(s["fds"])) for s in half]
    span = (half[-1]["t"] - half[0]["t"]) if len(half) > 1 else 0.0
    rss_growth = slope(rss) * span if len(rss) > 1 else 0.0
    fd_growth = slope(fd) * span if len(fd) > 1 else 0.0
    mean_rss = statistics.fmean(r for _, r in rss) if rss else 0.0
    lost = len(tally.stored - tally.received)
    checks = {
        "lost": lost == 0,
        "no error frames but unavailable": not tally.errors,
        "duplicates in a connection": tally.duplicates == 0,
        "rss flat": abs(rss_growth) <= RSS_GROWTH * mean_rss,
        "fds flat": abs(fd_growth) <= FD_GROWTH,
        "tasks back once the clients left": (after["tasks"] or 0) <= (before["tasks"] or 0),
        # The driver keeps the connections its pool opened under load.
        "fds back once the clients left": after["fds_not_database"] <= before["fds_not_database"],
    }
    return {
        "stored": len(tally.stored),
        "lost": lost,
        "duplicates_in_a_connection": tally.duplicates,
        "recipient_reconnects": tally.churned,
        "resent": tally.resent,
        "generations": tally.generations,
        "errors": tally.errors[:10],
        "last_half_rss_growth_kib": round(rss_growth, 1),
        "last_half_mean_rss_kib": round(mean_rss, 1),
        "last_half_fd_growth": round(fd_growth, 2),
        "before_load": before,
        "after_load": after,
        "checks": checks,
        "passed": all(checks.values()),
    }


def plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s["t"] / 60 for s in samples], [(s["rss_kib"] or 0) / 1024 for s in samples])
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("Tidings under steady load and churn (make soak)")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=4.0, help="messages/s per sender")
    parser.add_argument("--churn", type=int, default=5, help="short connections per second")
    parser.add_argument("--rotate", type=float, default=60.0, help="seconds per generation")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()
    run_record = runinfo.record(kind="soak")
    print(
        f"[soak] run {run_record['id']}: {args.minutes:g} min of load on Tidings "
        f"{run_record['source'].get('commit', '?')} and nx-27017; a line every "
        f"{clock(PROGRESS_EVERY)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tidings-soak-") as tmp:
        try:
            run = asyncio.run(soak(args, Path(tmp)))
        finally:
            stop_all()
    verdict = judge(run, args.minutes)
    run_record["finished"] = runinfo.now()
    result = {
        "run": run_record,
        "params": vars(args),
        "verdict": verdict,
        "samples": run["samples"],
    }
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    plot(run["samples"], ROOT / "docs" / "soak.png")
    print(orjson.dumps(verdict, option=orjson.OPT_INDENT_2).decode())
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
