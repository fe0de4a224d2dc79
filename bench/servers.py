"""The processes a run starts: Tidings, the bare echo app and nx-27017.

Each runs on 127.0.0.1 on a free port, pinned to the server core, with its
output in a log file, and is stopped when its ``async with`` block ends. Every
process started is also in ``LIVE``, so that ``stop_all`` can end whatever a
crash left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from bench.proc import SERVER_CORE, free_port, pinned

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
SNAPSHOT_TIMEOUT = 10.0

# The load generator must not be cut off by Tidings' own limits: the settings
# the brief fixes, plus a drain without the 5 s grace a load balancer needs.
TIDINGS_ENV = {
    "TIDINGS_DEV": "1",
    "TIDINGS_HOST": "127.0.0.1",
    "TIDINGS_RATE_LIMIT": "1000000",
    "TIDINGS_RATE_BURST": "1000000",
    "TIDINGS_RATE_ABUSE": "1000000",
    "TIDINGS_MAX_CONNECTIONS": "20000",
    "TIDINGS_DRAIN_DELAY": "0",
    "TIDINGS_WRITE_TIMEOUT": "2",
    "TIDINGS_CLOSE_TIMEOUT": "2",
}

LIVE: set[Managed] = set()
_serial = itertools.count(1)


class ServerFailed(RuntimeError):
    """A server did not start, or died; the message ends with its log's last lines."""


def stop_all() -> None:
    """Kill every process still running that this run started (used on the way out)."""
    for managed in list(LIVE):
        managed.kill()


def base_env() -> dict[str, str]:
    # No TIDINGS_* from the caller's shell: a JWT secret there would switch dev mode off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    # The runners are modules of this package; keep any PYTHONPATH the caller set
    # (it may point at another checkout of src/ to benchmark).
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Managed:
    """One subprocess pinned to the server core, with its output in ``log``."""

    kind = "process"

    def __init__(self, workdir: Path) -> None:
        self.serial = next(_serial)
        self.workdir = workdir
        self.log = workdir / "logs" / f"{self.serial:02d}-{self.kind}.log"
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return base_env()

    async def ready(self) -> bool:
        """One readiness probe; True once the process serves."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start the process and wait, bounded, until it is ready."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *pinned(self.argv(), SERVER_CORE),
                env=self.env(),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a Ctrl-C in the terminal reaches only the
                # harness, which then stops its servers in order.
                start_new_session=True,
            )
        LIVE.add(self)
        deadline = time.monotonic() + READY_TIMEOUT
        while not await self.ready():
            if self._process.returncode is not None:
                LIVE.discard(self)
                raise ServerFailed(
                    f"{self.kind} exited with {self._process.returncode} while starting; "
                    f"{self.log}:\n{_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerFailed(
                    f"{self.kind} not ready within {READY_TIMEOUT:g} s; "
                    f"{self.log}:\n{_tail(self.log)}"
                )
            # Polled: readiness is an HTTP answer or a ping, nothing to wait on.
            await asyncio.sleep(0.1)

    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self._process is not None and self.alive():
            self._process.send_signal(sig)

    async def stop(self) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL; returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        LIVE.discard(self)
        return process.returncode

    def kill(self) -> None:
        """SIGKILL at once, without waiting (for the way out of a crashed run)."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        LIVE.discard(self)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def http_status(port: int, path: str) -> int | None:
    """The status code of ``GET path`` on 127.0.0.1:port, or None when it fails."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


class _WebServer(Managed):
    """A uvicorn process configured by TIDINGS_* variables, ready when /readyz says 200."""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def env(self) -> dict[str, str]:
        return {**super().env(), **TIDINGS_ENV, "TIDINGS_PORT": str(self.port)}

    async def ready(self) -> bool:
        return await http_status(self.port, "/readyz") == 200


class TidingsServer(_WebServer):
    """Tidings as ``tidings serve`` runs it, through ``bench.server`` (command counting).

    ``mongodb_uri`` unset: the embedded store. Set: that server, in collection
    scope, on a fresh database.
    """

    kind = "tidings"

    def __init__(self, workdir: Path, mongodb_uri: str | None = None) -> None:
        super().__init__(workdir)
        self.mongodb_uri = mongodb_uri
        self.database = f"bench{self.serial}"
        self.commands_file = workdir / f"{self.serial:02d}-commands.json"
        self._snapshots = 0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.server"]

    def env(self) -> dict[str, str]:
        env = {**super().env(), "BENCH_COMMANDS_FILE": str(self.commands_file)}
        if self.mongodb_uri is not None:
            env["TIDINGS_MONGODB_URI"] = self.mongodb_uri
            env["TIDINGS_CHANGE_STREAM_SCOPE"] = "collection"
            env["TIDINGS_DATABASE"] = self.database
        return env

    async def snapshot_commands(self) -> dict[str, int]:
        """The command counts so far, as the server writes them on SIGUSR1."""
        self._snapshots += 1
        path = Path(f"{self.commands_file}.snapshot")
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while time.monotonic() < deadline:
            counts = await asyncio.to_thread(_read_snapshot, path, self._snapshots)
            if counts is not None:
                return counts
            await asyncio.sleep(0.05)
        raise ServerFailed(f"no command snapshot within {SNAPSHOT_TIMEOUT:g} s")


def _read_snapshot(path: Path, seq: int) -> dict[str, int] | None:
    """The counts in a snapshot file once it holds snapshot number ``seq``."""
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if data.get("seq") != seq:
        return None
    return {str(k): int(v) for k, v in data["counts"].items()}


class EchoServer(_WebServer):
    """The bare baseline: ``bench.echo`` under Tidings' own uvicorn configuration."""

    kind = "echo"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.echo"]


class NxServer(Managed):
    """nx-27017 (MongoDB's wire protocol on SQLite), as tests/mongo.py starts it."""

    kind = "nx-27017"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data_dir = workdir / f"{self.serial:02d}-nx-data"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def argv(self) -> list[str]:
        executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent))
        if executable is None:
            raise ServerFailed("nx-27017 is not installed: it is a dev dependency (make bench)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            executable,
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--log-file",
            str(self.log.with_suffix(".nx.log")),
            "--pid-file",
            str(self.data_dir / "nx.pid"),
        ]

    async def ready(self) -> bool:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.uri, serverSelectionTimeoutMS=300
        )
        try:
            await client.admin.command("ping")
        except PyMongoError:
            return False
        finally:
            await client.close()
        return True

    async def stop(self) -> int | None:
        code = await super().stop()
        # Its SQLite files can reach hundreds of MB after the flat-inbox preload.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return code
