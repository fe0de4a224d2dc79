"""Tidings as a real process of its own, for the tests that need separate processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import TIMEOUT, free_port


def server_environment(pythonpath: Path | None, **settings: str) -> dict[str, str]:
    """The environment of a ``tidings serve`` process: ``TIDINGS_*`` from ``settings`` only."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TIDINGS_") and name != "PYTHONPATH"
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update({f"TIDINGS_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class Served:
    """A ``tidings serve`` process started by :func:`serving`."""

    url: str
    process: asyncio.subprocess.Process
    killed: bool = False
    log: str = ""  # its standard error, once it has exited
    # Exit statuses the test accepts besides 0 (a drain ended by its deadline, say).
    also_exits: tuple[int, ...] = ()

    def kill(self) -> None:
        """SIGKILL it: no drain, no clean-up, as when a node dies."""
        self.killed = True
        self.process.kill()


@asynccontextmanager
async def serve_process(
    uri: str, database: str, workdir: Path, pythonpath: Path | None = None
) -> AsyncIterator[Served]:
    """:func:`serving` in dev mode on the MongoDB at ``uri`` (``collection`` scope, as
    nx-27017 needs)."""
    async with serving(
        workdir,
        pythonpath,
        dev="1",
        mongodb_uri=uri,
        database=database,
        change_stream_scope="collection",
    ) as served:
        yield served


@asynccontextmanager
async def serving(
    workdir: Path, pythonpath: Path | None = None, **settings: str
) -> AsyncIterator[Served]:
    """``python -m tidings.cli serve`` in a process of its own, ready, with ``settings``.

    With ``pythonpath``, the ``tidings`` package found there runs instead of
    the installed one. The process is stopped with SIGTERM and must exit 0,
    unless the test killed it.
    """
    port = free_port()
    defaults = {
        "port": str(port),
        "log_level": "WARNING",
        "drain_delay": "0",  # Nothing balances load here: stop without the wait.
    }
    env = server_environment(pythonpath, **{**defaults, **settings})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli",
        "serve",
        env=env,
        cwd=workdir,  # Not the repository: nothing there may shadow the package.
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    served = Served(f"ws://127.0.0.1:{port}/ws", process)
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}", process)
        yield served
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), TIMEOUT)
        except TimeoutError:
            process.kill()  # Leave no server behind; the timeout is the failure.
            await process.wait()
            raise
        served.log = (await asyncio.wait_for(stderr, TIMEOUT)).decode(errors="replace")
        if process.returncode not in (0, *served.also_exits) and not served.killed:
            print(f"tidings serve exited {process.returncode}:\n{served.log}", file=sys.stderr)
    expected = (-signal.SIGKILL,) if served.killed else (0, *served.also_exits)
    assert process.returncode in expected, f"tidings serve exited {process.returncode}"


@asynccontextmanager
async def tidings_serve(
    uri: str, database: str, workdir: Path, pythonpath: Path | None = None
) -> AsyncIterator[str]:
    """:func:`serve_process`, for tests that need only its ``ws://`` URL."""
    async with serve_process(uri, database, workdir, pythonpath) as served:
        yield served.url


async def wait_until_ready(base: str, process: asyncio.subprocess.Process) -> None:
    """Poll ``/readyz`` until it answers 200; fail if the process exits first."""
    async with httpx.AsyncClient(base_url=base) as http, asyncio.timeout(TIMEOUT * 2):
        while process.returncode is None:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"tidings serve exited {process.returncode} before it was ready")
