"""What a figure reports: rows of measured value, baseline, ratio, target and verdict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# ok: measured as planned; timeout: a bound was hit and the row holds what was
# reached; unsaturated: the server was not the bottleneck (under 0.9 of its
# core), so the figure says more about the load generator than about it;
# error: nothing usable was measured; skipped: not measured here.
Status = Literal["ok", "timeout", "unsaturated", "error", "skipped"]


@dataclass(frozen=True)
class Target:
    """A bound on a row's ratio (or, with ``on="measured"``, on the measured value)."""

    op: Literal["<=", ">="]
    value: float
    on: Literal["ratio", "measured"] = "ratio"
    unit: str = ""

    def met(self, row: Row) -> bool | None:
        """Whether ``row`` meets this target; None when the value is missing."""
        value = row.ratio if self.on == "ratio" else row.measured
        if value is None:
            return None
        return value <= self.value if self.op == "<=" else value >= self.value

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.op} {self.value:,g}{unit}"


@dataclass
class Row:
    """One line of the table.

    ``ratio`` is measured ÷ baseline, both taken in the same run. A row whose
    status is not ``ok`` never passes, even when its partial ratio would: its
    verdict is "incomplete" (timeout, unsaturated) or "error". ``unmet`` names a
    requirement beside the target that the run did not meet (the sampled
    connections answering, say): the row then fails whatever its value.
    """

    name: str
    unit: str
    measured: float | None
    baseline: float | None
    baseline_name: str
    target: Target | None = None
    status: Status = "ok"
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    unmet: str = ""
    # Share of one core the load generator and the server used (1.0 = a whole core).
    cpu: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.measured is not None and self.baseline:
            self.ratio = self.measured / self.baseline

    @property
    def passed(self) -> bool | None:
        """True or False against the target; None when there is no target, or when the
        row is not ``ok`` (a partial measurement neither passes nor fails)."""
        if self.target is None or self.status != "ok":
            return None
        if self.unmet:
            return False
        return bool(self.target.met(self))

    @property
    def verdict(self) -> str:
        """What the table says: pass, FAIL, incomplete, error, not measured, or a dash."""
        if self.status == "skipped":
            return "not measured"
        if self.status == "error":
            return "error"
        if self.status in ("timeout", "unsaturated"):
            return "incomplete"
        if self.passed is None:
            return "—"
        return "pass" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target"] = dataclasses.asdict(self.target) if self.target else None
        data["target_text"] = str(self.target) if self.target else None
        data["passed"] = self.passed
        data["verdict"] = self.verdict
        return data


@dataclass
class FigureResult:
    """Everything one figure measured, as written to ``bench/results/<key>.json``."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.key,
            "title": self.title,
            "params": self.params,
            "rows": [row.to_json() for row in self.rows],
            "series": self.series,
            "error": self.error,
        }


def error_row(name: str, unit: str, baseline_name: str, reason: str) -> Row:
    """A row for a measurement that produced nothing usable."""
    return Row(name, unit, None, None, baseline_name, status="error", note=reason)
