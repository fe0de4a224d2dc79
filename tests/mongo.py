"""MongoDB servers for the tests: nx-27017 started on a free port, or a real one if given."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.helpers import TIMEOUT, free_port

# Set to a replica set's URI to run the MongoDB suites against it as well.
REAL_MONGODB_URI = os.environ.get("TIDINGS_TEST_MONGODB_URI")


class NxServer:
    """An nx-27017 process (a MongoDB wire-protocol server on SQLite) on 127.0.0.1.

    It keeps its data in ``data_dir``, one SQLite file per database, so a
    killed server restarted on the same port finds everything it had.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The connection string; a short server selection timeout keeps failures quick."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        """Start the server and wait until it answers a ping."""
        executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent))
        assert executable is not None, "nx-27017 is a dev dependency: run make test"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                executable,
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--log-file",
                str(self.data_dir / "nx.log"),
                "--pid-file",
                str(self.data_dir / "nx.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"nx-27017 exited with {self._process.returncode}")
            try:
                probe: MongoClient[dict[str, object]]
                with MongoClient(self.uri, serverSelectionTimeoutMS=200) as probe:
                    probe.admin.command("ping")
                return
            except PyMongoError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """Kill the server the hard way, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(TIMEOUT)
        self._process = None

    def freeze(self) -> None:
        """Stop the process without killing it: its sockets stay open and answer nothing."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen server run again."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    @property
    def frozen(self) -> bool:
        """Whether the process is stopped right now (state ``T`` in /proc)."""
        assert self._process is not None
        with open(f"/proc/{self._process.pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")

    def stop(self) -> None:
        """Stop the server politely."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # A frozen server cannot stop.
            self._process.terminate()
            try:
                self._process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(TIMEOUT)
        self._process = None


def change_event(
    operation: str,
    *,
    token: dict[str, Any],
    collection: str,
    doc_id: Any,
    full: Mapping[str, Any] | None = None,
    updated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A change event as MongoDB documents it."""
    event: dict[str, Any] = {
        "_id": token,
        "operationType": operation,
        "ns": {"db": "tidings", "coll": collection},
        "documentKey": {"_id": doc_id},
    }
    if full is not None:
        event["fullDocument"] = full
    if operation == "update":
        event["updateDescription"] = {
            "updatedFields": dict(updated or {}),
            "removedFields": [],
            "truncatedArrays": [],
        }
    return event


def nx_oid(hex_id: str) -> dict[str, Any]:
    """An ObjectId as nx-27017 encodes it in change-stream documents."""
    return {"__neosqlite_objectid__": True, "id": hex_id}
