"""What every figure needs: the run's context and a few ways of describing a run."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.load import RunResult
from bench.plan import Plan
from bench.result import Status

# A load generator above this share of its core may be what limits the run.
SATURATED_CPU = 0.9


@dataclass(frozen=True)
class Context:
    """The plan, and where this run keeps its logs and database files."""

    plan: Plan
    workdir: Path


def status(*timed_out: bool) -> Status:
    """``timeout`` when any part of a measurement hit its bound."""
    return "timeout" if any(timed_out) else "ok"


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that exist."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def reached(run: RunResult) -> str:
    """ "reached X of Y" for a run that hit its bound, else an empty string."""
    if not run.timed_out:
        return ""
    done = run.counted if run.measure == "counted" else run.stored
    return f"reached {done} of {run.expected} within the bound"


def generator_note(*shares: float | None, side: str = "") -> str:
    """A warning when the load generator was busy enough to be the limit (of ``side``)."""
    busiest = max((s for s in shares if s is not None), default=None)
    if busiest is not None and busiest >= SATURATED_CPU:
        where = f"{side}: " if side else ""
        return f"{where}load generator at {busiest:.0%} of its core: it may be the limit"
    return ""


def join(*parts: str) -> str:
    """The non-empty parts, separated by semicolons."""
    return "; ".join(p for p in parts if p)
