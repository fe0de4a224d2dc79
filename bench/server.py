"""Tidings exactly as ``tidings serve`` runs it, with PyMongo command counting inside.

``python -m bench.server`` registers a ``CommandListener`` globally before the
app creates its client, then hands over to ``tidings.cli.main(["serve"])``, so
settings, logging, uvicorn options and the SIGTERM drain are the real ones.

With ``BENCH_COMMANDS_FILE`` set, it counts the commands the server sends to
the database by name, and writes them as JSON:

- on SIGUSR1, to ``$BENCH_COMMANDS_FILE.snapshot`` with a sequence number, so
  that the harness can subtract what happened before (identification);
- when it exits (after SIGTERM or SIGINT), to ``$BENCH_COMMANDS_FILE``.

Change-stream aggregates are counted as ``aggregate$changeStream``, apart
from ordinary aggregates, and the ``getMore`` and ``killCursors`` of the
cursors they opened as ``getMore$changeStream`` and
``killCursors$changeStream``, so that the harness can leave out exactly those
and count the ones of ordinary cursors.

With ``BENCH_TASKS_FILE`` set, SIGUSR2 writes the number of asyncio tasks
there (the soak samples it).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import orjson
from pymongo import monitoring

from bench.proc import raise_nofile_limit


class CommandCounter(monitoring.CommandListener):
    """Counts started commands by name, change-stream cursors' apart."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        # Requests that opened a change stream, until their reply names its cursor.
        self._opening: set[tuple[int, object]] = set()
        self._streams: set[int] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        command = event.command
        if name == "aggregate":
            pipeline = command.get("pipeline") or [{}]
            if "$changeStream" in pipeline[0]:
                name = "aggregate$changeStream"
                self._opening.add((event.request_id, event.connection_id))
        elif name == "getMore" and command.get("getMore") in self._streams:
            name = "getMore$changeStream"
        elif name == "killCursors":
            cursors = set(command.get("cursors") or ())
            if cursors & self._streams:
                name = "killCursors$changeStream"
                self._streams -= cursors
        self.counts[name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Remember the cursor a change stream opened."""
        key = (event.request_id, event.connection_id)
        if key in self._opening:
            self._opening.discard(key)
            cursor = (event.reply.get("cursor") or {}).get("id")
            if cursor:
                self._streams.add(int(cursor))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to count: a failed command was counted when it started."""
        self._opening.discard((event.request_id, event.connection_id))


def _write(path: Path, data: dict[str, object]) -> None:
    # Written aside then renamed, so that the harness never reads half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(orjson.dumps(data))
    partial.replace(path)


def main() -> int:
    """Run ``tidings serve`` with the listener; write the counts on SIGUSR1 and on exit."""
    raise_nofile_limit()
    counter = CommandCounter()
    # Registered before anything builds a client: only clients created later see it.
    monitoring.register(counter)
    target = os.environ.get("BENCH_COMMANDS_FILE")
    seq = 0

    def snapshot(signum: int, frame: FrameType | None) -> None:
        nonlocal seq
        seq += 1
        if target:
            _write(Path(f"{target}.snapshot"), {"seq": seq, "counts": dict(counter.counts)})

    signal.signal(signal.SIGUSR1, snapshot)
    tasks_file = os.environ.get("BENCH_TASKS_FILE")

    def count_tasks(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the loop's thread, so the loop is its own.
        if tasks_file:
            _write(Path(tasks_file), {"tasks": len(asyncio.all_tasks())})

    signal.signal(signal.SIGUSR2, count_tasks)
    # Imported late, so that nothing of Tidings can create a client before the
    # listener is registered.
    from tidings.cli import main as tidings_main

    try:
        return tidings_main(["serve"])
    finally:
        if target:
            _write(Path(target), {"seq": seq, "counts": dict(counter.counts)})


if __name__ == "__main__":
    sys.exit(main())
