"""The server: connections, the handshake, change-stream commands and the faults tests inject."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from bson import ObjectId

from tests.helpers import TIMEOUT
from tests.wire.changes import Cursor, Oplog
from tests.wire.codec import Request, encode_reply, read_request
from tests.wire.commands import Crud, Reply
from tests.wire.errors import CommandError

log = logging.getLogger("tests.wire")

MAX_WIRE_VERSION = 21  # MongoDB 7.0
RESUMABLE = ("ResumableChangeStreamError",)
# Answered and otherwise ignored: sessions, and what a driver says on its way out.
_NOOPS = frozenset({"ping", "endSessions", "killAllSessions", "abortTransaction"})


@dataclass
class Fault:
    """The next ``times`` commands named ``command`` on change streams fail this way."""

    command: Literal["aggregate", "getMore"]
    times: int
    code: int = 0
    labels: tuple[str, ...] = ()
    disconnect: bool = False  # close the connection instead of answering


class WireMongo:
    """A single-node replica set on 127.0.0.1 that PyMongo talks to over TCP.

    Use as ``async with WireMongo() as mongo:``; ``mongo.uri`` is its address.
    """

    def __init__(self) -> None:
        self.crud = Crud()
        self.oplog = self.crud.oplog
        self.faults: list[Fault] = []
        self.commands: list[str] = []  # every command name received, in order
        # The $changeStream options of every change-stream aggregate received, in order.
        self.watches: list[dict[str, Any]] = []
        self.getmores = 0  # change-stream getMores received
        self.parked = 0  # change-stream getMores waiting right now, for events or a release
        self.held = 0  # those of them held by ``hold()``
        self._released = asyncio.Event()
        self._released.set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ids = itertools.count(1)
        self.port = 0

    @property
    def uri(self) -> str:
        """The connection string."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    async def __aenter__(self) -> WireMongo:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.release()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    # ------------------------------------------------------------------ control

    def fail(
        self,
        command: Literal["aggregate", "getMore"],
        code: int,
        labels: tuple[str, ...] = (),
        times: int = 1,
    ) -> None:
        """Make the next ``times`` change-stream ``command``s fail with ``code`` and ``labels``."""
        self.faults.append(Fault(command, times, code, labels))

    def disconnect(self, command: Literal["aggregate", "getMore"] = "getMore") -> None:
        """Close the connection of the next change-stream ``command`` instead of answering."""
        self.faults.append(Fault(command, 1, disconnect=True))

    def forget(self) -> None:
        """Lose the oplog before now: a stream standing before now gets 286."""
        self.oplog.forget()

    def hold(self) -> None:
        """Change-stream getMores wait, answering nothing, until ``release``."""
        self._released.clear()
        self.oplog.notify()

    def release(self) -> None:
        """Let held getMores answer: with a fault if one is armed, else with events."""
        self._released.set()
        self.oplog.notify()

    async def until(self, predicate: Callable[[], bool], within: float = TIMEOUT) -> None:
        """Wait until ``predicate`` holds, checked at every write and getMore."""
        if not await self.oplog.until(predicate, within):
            raise TimeoutError(f"the wire fake never reached {predicate}")

    # ------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                reply = await self._answer(request, writer)
                if reply is None:  # a fault closed the connection
                    return
                if not request.no_reply:
                    writer.write(encode_reply(request, reply, next(self._ids)))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # The client went away.
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(self, request: Request, writer: asyncio.StreamWriter) -> Reply | None:
        command = request.command
        name = next(iter(command))
        self.commands.append(name)
        try:
            reply = await self._run(name, command, writer)
        except CommandError as exc:
            reply = exc.reply()
        if reply is not None:
            reply.setdefault("operationTime", self.oplog.now())
        return reply

    async def _run(self, name: str, command: Mapping[str, Any], writer: Any) -> Reply | None:
        if name in ("hello", "isMaster", "ismaster"):
            return self._hello(name)
        if name in _NOOPS:
            return {"ok": 1.0}
        if name == "buildInfo":
            return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1.0}
        if name == "aggregate" and _is_change_stream(command):
            return await self._watch(command, writer)
        if name == "getMore" and command["getMore"] in self.oplog.cursors:
            return await self._get_more(command, writer)
        if name == "getMore":
            raise CommandError(43, f"cursor id {command['getMore']} not found")
        if name == "killCursors":
            return self._kill(command)
        if self.crud.knows(name):
            return self.crud.run(name, command)
        log.warning("wire_fake_unknown_command %s: %s", name, dict(command))
        raise CommandError(59, f"no such command: '{name}' (not implemented by the fake)")

    def _hello(self, name: str) -> Reply:
        primary = "isWritablePrimary" if name == "hello" else "ismaster"
        me = f"127.0.0.1:{self.port}"
        return {
            "helloOk": True,
            primary: True,
            "secondary": False,
            "setName": "rs0",
            "setVersion": 1,
            "electionId": ObjectId("7fffffff0000000000000001"),
            "hosts": [me],
            "primary": me,
            "me": me,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": next(self._ids),
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
            "ok": 1.0,
        }

    # ------------------------------------------------------------------ change streams

    def _fault(self, command: str) -> Fault | None:
        for fault in self.faults:
            if fault.command == command:
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _watch(self, command: Mapping[str, Any], writer: Any) -> Reply | None:
        self.watches.append(dict(command["pipeline"][0]["$changeStream"]))
        self.oplog.notify()
        fault = self._fault("aggregate")
        if fault is not None:
            return self._inflict(fault, writer)
        db, target = command["$db"], command["aggregate"]
        coll = None if target == 1 else str(target)
        stage, *stages = command["pipeline"]
        cursor = self.oplog.open(db, coll, stage["$changeStream"], stages)
        cursor.batch_size = command.get("cursor", {}).get("batchSize") or cursor.batch_size
        # The aggregate answers at once with what is there; only getMores wait.
        events, pbrt = self.oplog.batch(cursor)
        return self.oplog.reply(cursor, events, pbrt, first=True)

    async def _get_more(self, command: Mapping[str, Any], writer: Any) -> Reply | None:
        cursor = self.oplog.cursors[command["getMore"]]
        self.getmores += 1
        self.parked += 1
        self.oplog.notify()
        try:
            return await self._next_batch(cursor, Oplog.await_ms(command) / 1000, writer)
        except CommandError:
            self.oplog.cursors.pop(cursor.id, None)  # A failed getMore kills its cursor.
            raise
        finally:
            self.parked -= 1
            self.oplog.notify()

    async def _next_batch(self, cursor: Cursor, wait: float, writer: Any) -> Reply | None:
        while True:
            if not self._released.is_set():
                self.held += 1
                self.oplog.notify()
                try:
                    await self._released.wait()
                finally:
                    self.held -= 1
            fault = self._fault("getMore")
            if fault is not None:
                self.oplog.cursors.pop(cursor.id, None)
                return self._inflict(fault, writer)
            events, pbrt = self.oplog.batch(cursor)
            if not events:
                end = self.oplog.end

                def woken(end: int = end) -> bool:
                    # A hold() reaches a getMore already waiting too: it has not answered yet.
                    gone = cursor.id not in self.oplog.cursors
                    return self.oplog.end != end or gone or not self._released.is_set()

                await self.oplog.until(woken, wait)
                if not self._released.is_set():
                    continue
                events, pbrt = self.oplog.batch(cursor)
            if cursor.id not in self.oplog.cursors and not cursor.invalidated:
                raise CommandError(237, f"cursor {cursor.id} was killed")
            return self.oplog.reply(cursor, events, pbrt, first=False)

    def _inflict(self, fault: Fault, writer: Any) -> Reply | None:
        if fault.disconnect:
            writer.transport.abort()
            return None
        raise CommandError(fault.code, f"injected by the test ({fault.code})", fault.labels)

    def _kill(self, command: Mapping[str, Any]) -> Reply:
        killed: list[int] = []
        missing: list[int] = []
        for cursor_id in command.get("cursors", []):
            (killed if self.oplog.cursors.pop(cursor_id, None) else missing).append(cursor_id)
        self.oplog.notify()
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": missing,
            "cursorsAlive": [],
            "cursorsUnknown": [],
            "ok": 1.0,
        }


def _is_change_stream(command: Mapping[str, Any]) -> bool:
    pipeline = command.get("pipeline") or []
    return bool(pipeline) and "$changeStream" in pipeline[0]
