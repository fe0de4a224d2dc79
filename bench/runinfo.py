"""What every results file says about its run: an id, when, where, and which Tidings."""

from __future__ import annotations

import datetime
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import machine


def now() -> str:
    """The UTC time, as results files write it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def source() -> dict[str, Any]:
    """Which Tidings is under test: where it is imported from, and its commit.

    ``BENCH_SOURCE`` describes it instead of git, for a copy outside any
    checkout (a snapshot of a working tree that keeps changing, say).
    """
    spec = importlib.util.find_spec("tidings")
    origin = Path(spec.origin).parent if spec is not None and spec.origin else None
    info: dict[str, Any] = {"path": str(origin) if origin else None}
    if os.environ.get("BENCH_SOURCE"):
        info["commit"] = os.environ["BENCH_SOURCE"]
        return info
    git = shutil.which("git")
    if origin is None or git is None:
        return info
    try:
        info["commit"] = _git(git, origin, "rev-parse", "--short", "HEAD").strip()
        info["dirty"] = bool(_git(git, origin, "status", "--porcelain", "--", ".").strip())
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "not a git checkout"
    return info


def _git(git: str, cwd: Path, *args: str) -> str:
    return subprocess.run(
        [git, *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout


def record(**extra: Any) -> dict[str, Any]:
    """A run's record: its id (the UTC start, to the second), start, machine, source."""
    return {
        "id": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "started": now(),
        "machine": machine.describe(),
        "source": source(),
        **extra,
    }
