"""The figures, in the order a full run measures them.

Each module measures one figure (or a family of them) and returns a
``FigureResult``; none of them decides where results go.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# Module imports, not names from this package: mypy resolves those against this
# very __init__ and, depending on its cache, finds no "memory" here.
import bench.figures.commands as commands
import bench.figures.flat as flat
import bench.figures.latency as latency
import bench.figures.memory as memory
import bench.figures.store as store
import bench.figures.throughput as throughput
from bench.figures.common import Context
from bench.result import FigureResult


@dataclass(frozen=True)
class Figure:
    """A figure's key (its JSON file's name), title and measuring function."""

    key: str
    title: str
    measure: Callable[[Context], Awaitable[FigureResult]]


FIGURES = {
    f.key: f
    for f in (
        Figure("m1", "M1 throughput", throughput.run),
        Figure("flat", "Flat inbox", flat.run),
        Figure("m2", "M2 store path", store.run),
        Figure("m3", "M3 latency", latency.run_m3),
        Figure("m4", "M4 fan-out", latency.run_m4),
        Figure("m5", "M5 memory", memory.run),
        Figure("m6", "M6 database commands", commands.run),
        Figure("sweep", "Latency against offered load", latency.run_sweep),
    )
}
