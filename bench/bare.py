"""Bare PyMongo baselines against the same nx-27017, in Tidings' seat.

``run_bare`` starts ``python -m bench.bare MODE ...`` pinned to the server core,
where Tidings runs in the measured run, so that the baseline and Tidings share
the database's core alike; it prints one JSON object.

Modes:

- ``insert``: ``insert_one`` loops, one collection per task, as many tasks as
  the measured run has senders (M2);
- ``watch``: one collection ``watch()``, ``try_next()`` polled with a pause
  when it returns nothing (as Tidings polls), while another task inserts at a
  fixed rate: insert→change-event latency (M3). With ``--streams N`` it also
  follows N - 1 other collections, written to by nobody, polled the same way:
  Tidings on nx-27017 follows one stream per identified user (collection
  scope), and nx-27017 serves every poll of them on the thread that serves the
  inserts;
- ``flat``: the flat-inbox queries on a collection of N documents and on an
  empty one: inserts, backlog reads, ack look-ups and updates (flat inbox).

Documents have the shape of Tidings' inbox documents and the collections its
indexes, as Tidings creates them on nx-27017 (no ``_id`` in the backlog index).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from bench.load import percentile
from bench.proc import SERVER_CORE, pinned
from bench.servers import REPO, base_env

Document = dict[str, Any]
Coll = AsyncCollection[Document]

INDEXES = [
    IndexModel([("k", ASCENDING), ("mid", ASCENDING), ("from", ASCENDING)], unique=True),
    IndexModel([("k", ASCENDING), ("state", ASCENDING)]),
]
PENDING = ["stored", "sent"]
CONTENT = "hello from the load generator"
# try_next() returning nothing is followed by this pause, as in Tidings' feed.
IDLE_PAUSE = 0.05
BARE_TIMEOUT = 600.0


class BareFailed(RuntimeError):
    """The baseline process failed or printed no result."""


def inbox_doc(mid: str, state: str = "stored", seq: int = 0) -> Document:
    """A document shaped like a Tidings inbox document."""
    now = datetime.now(UTC)
    return {
        "_id": ObjectId(),
        "k": "in",
        "mid": mid,
        "from": "sender@bench.test",
        "to": "recipient@bench.test",
        "sent_at": now,
        "content": CONTENT,
        "state": state,
        "at": {state: now},
        "seq": seq,
    }


async def _collection(db: AsyncDatabase[Document], name: str) -> Coll:
    coll = db[name]
    await coll.create_indexes(INDEXES)
    return coll


async def insert_rate(
    db: AsyncDatabase[Document], tasks: int, per_task: int, budget: float
) -> Document:
    """``tasks`` concurrent ``insert_one`` loops, one collection each."""
    colls = [await _collection(db, f"insert{i}") for i in range(tasks)]
    done = 0
    started = time.monotonic()
    deadline = started + budget

    async def loop(coll: Coll, task: int) -> None:
        nonlocal done
        for i in range(per_task):
            if time.monotonic() > deadline:
                return
            await coll.insert_one(inbox_doc(f"t{task}m{i}"))
            done += 1

    await asyncio.gather(*(loop(c, i) for i, c in enumerate(colls)))
    elapsed = time.monotonic() - started
    return {
        "tasks": tasks,
        "expected": tasks * per_task,
        "done": done,
        "elapsed_s": round(elapsed, 3),
        "rate_per_s": done / elapsed,
        "timed_out": done < tasks * per_task,
    }


async def watch_latency(
    db: AsyncDatabase[Document], rate: float, duration: float, drain: float, streams: int = 1
) -> Document:
    """Insert at ``rate``/s for ``duration`` s into one watched collection; latency
    from when each insert was due to when its change event came out of ``try_next``.

    ``streams`` - 1 other collections, into which nothing is written, are
    followed alongside, polled the same way."""
    coll = await _collection(db, "watched")
    idle = [await _collection(db, f"idle{i}") for i in range(1, max(1, streams))]
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * duration))
    due: dict[int, float] = {}
    latencies: dict[int, float] = {}
    got_all = asyncio.Event()
    watches = [
        await c.watch(full_document="updateLookup", max_await_time_ms=1000) for c in [coll, *idle]
    ]

    def measure(change: Document) -> None:
        seq = (change.get("fullDocument") or {}).get("seq")
        if isinstance(seq, int) and seq in due and seq not in latencies:
            latencies[seq] = loop.time() - due[seq]
            if len(latencies) >= total:
                got_all.set()

    async def follow(
        stream: AsyncChangeStream[Document], on_change: Callable[[Document], None]
    ) -> None:
        while stream.alive:
            change = await stream.try_next()
            if change is None:
                await asyncio.sleep(IDLE_PAUSE)
                continue
            on_change(change)
            # try_next() does not yield within a batch; let the inserter run.
            await asyncio.sleep(0)

    followers = [asyncio.create_task(follow(watches[0], measure))]
    followers += [asyncio.create_task(follow(s, lambda change: None)) for s in watches[1:]]
    inserts: set[asyncio.Task[object]] = set()
    start = loop.time() + 0.05
    lag = 0.0
    for i in range(total):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, loop.time() - at)
        due[i] = at
        # Not awaited one by one: an open-loop inserter, like the load generator.
        inserts.add(loop.create_task(coll.insert_one(inbox_doc(f"w{i}", seq=i))))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(got_all.wait(), max(0.0, start + duration + drain - loop.time()))
    for follower in followers:
        follower.cancel()
    for follower in followers:
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    await asyncio.gather(*inserts, return_exceptions=True)
    for stream in watches:
        await stream.close()
    values = list(latencies.values())
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {
        "rate": rate,
        "streams": len(watches),
        "expected": total,
        "received": len(values),
        "timed_out": len(values) < total,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "generator_lag_max_ms": lag * 1000,
    }


async def _timed(work: Callable[[int], Awaitable[object]], count: int) -> float:
    """Operations per second of ``count`` sequential calls of ``work(i)``."""
    started = time.monotonic()
    for i in range(count):
        await work(i)
    return count / max(time.monotonic() - started, 1e-9)


async def flat(
    db: AsyncDatabase[Document], preloaded: int, pending: int, sends: int, finds: int
) -> Document:
    """The flat-inbox queries on ``preloaded`` + ``pending`` documents and on ``pending`` only."""
    colls: dict[str, Coll] = {}
    load_started = time.monotonic()
    for name, acked in (("flat", preloaded), ("empty", 0)):
        coll = colls[name] = await _collection(db, name)
        for first in range(0, acked, 1000):
            batch = [
                inbox_doc(f"b{i}", "delivered") for i in range(first, min(acked, first + 1000))
            ]
            await coll.insert_many(batch, ordered=False)
        await coll.insert_many([inbox_doc(f"p{i}", "sent") for i in range(pending)])
    load_s = time.monotonic() - load_started
    rates: dict[str, dict[str, float]] = {"flat": {}, "empty": {}}

    def backlog(coll: Coll) -> Callable[[int], Awaitable[object]]:
        async def read(i: int) -> object:
            query = {"k": "in", "state": {"$in": PENDING}}
            return await coll.find(query).sort("_id", ASCENDING).limit(200).to_list(None)

        return read

    def insert(coll: Coll) -> Callable[[int], Awaitable[object]]:
        async def write(i: int) -> object:
            return await coll.insert_one(inbox_doc(f"a{i}"))

        return write

    def ack(coll: Coll) -> Callable[[int], Awaitable[object]]:
        # What an ack costs: find the message by id, then move its state on.
        async def move(i: int) -> object:
            found = (
                await coll.find({"k": "in", "mid": f"a{i}"})
                .sort("_id", DESCENDING)
                .limit(2)
                .to_list(None)
            )
            return await coll.find_one_and_update(
                {"_id": found[0]["_id"], "state": {"$in": PENDING}},
                {"$set": {"state": "delivered", "at.delivered": datetime.now(UTC)}},
                return_document=ReturnDocument.AFTER,
            )

        return move

    # Interleaved, flat then empty, so that drift hits both alike.
    for label, make, count in (
        ("identify_backlog", backlog, finds),
        ("stored", insert, sends),
        ("ack", ack, sends),
    ):
        for name in ("flat", "empty"):
            rates[name][label] = await _timed(make(colls[name]), count)
    return {
        "preloaded": preloaded,
        "pending": pending,
        "load_s": round(load_s, 3),
        "rates": rates,
        "ratios": {k: rates["flat"][k] / rates["empty"][k] for k in rates["flat"]},
    }


async def _main(args: argparse.Namespace) -> Document:
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        args.uri, serverSelectionTimeoutMS=10_000, tz_aware=True
    )
    try:
        db = client[args.db]
        if args.mode == "insert":
            return await insert_rate(db, args.tasks, args.count, args.budget)
        if args.mode == "watch":
            return await watch_latency(db, args.rate, args.duration, args.drain, args.streams)
        return await flat(db, args.preloaded, args.pending, args.count, args.finds)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.bare MODE --uri URI --db DB [options]``: print one JSON result."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("mode", choices=["insert", "watch", "flat"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--preloaded", type=int, default=0)
    parser.add_argument("--pending", type=int, default=100)
    parser.add_argument("--finds", type=int, default=20)
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


async def run_bare(mode: str, uri: str, db: str, within: float, **options: object) -> Document:
    """Run one baseline in its own process on the server core; its JSON result."""
    argv = [sys.executable, "-m", "bench.bare", mode, "--uri", uri, "--db", db]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    process = await asyncio.create_subprocess_exec(
        *pinned(argv, SERVER_CORE),
        cwd=REPO,
        env=base_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise BareFailed(f"bare {mode} did not finish within {within:g} s") from exc
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise BareFailed(f"bare {mode} exited with {process.returncode}: {' | '.join(tail)}")
    result: Document = orjson.loads(out.splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
