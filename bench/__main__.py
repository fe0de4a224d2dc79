"""``python -m bench [FIGURE ...]``: measure, write the JSON, the table and the plot.

Figures: m1, flat, m2, m3, m4, m5, m6, sweep (all of them when none is named).
The harness re-executes itself under ``taskset -c 1`` (the load-generator
core) unless it already runs there; the servers it starts run under
``taskset -c 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench import progress, report, runinfo
from bench.figures import FIGURES
from bench.figures.common import Context
from bench.plan import Plan
from bench.proc import LOAD_CORE, can_pin, raise_nofile_limit
from bench.result import FigureResult, error_row
from bench.servers import REPO, stop_all

PINNED_ENV = "BENCH_PINNED"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "figures", nargs="*", metavar="FIGURE", help=f"any of {', '.join(FIGURES)} (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results", help="where the JSON goes"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=REPO / "docs" / "benchmarks.md",
        help="the page whose table is rewritten",
    )
    parser.add_argument(
        "--plot", type=Path, default=REPO / "docs" / "latency.png", help="the PNG plot"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, for developing the harness"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one field of the plan (bench/plan.py)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep server logs even when all went well"
    )
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    return args


def _pin_self(argv: list[str]) -> bool:
    """Re-execute under ``taskset -c LOAD_CORE`` unless already there; False if impossible."""
    if os.sched_getaffinity(0) == {LOAD_CORE}:
        return True
    if os.environ.get(PINNED_ENV) or not can_pin():
        return False
    taskset = shutil.which("taskset")
    assert taskset is not None
    os.environ[PINNED_ENV] = "1"
    # This very command again, under taskset; it does not return.
    os.execv(taskset, [taskset, "-c", str(LOAD_CORE), sys.executable, "-m", "bench", *argv])  # noqa: S606
    return True  # Not reached: execv replaced this process.


# Seconds each figure takes in a full run on the 2-core machine, for the first
# progress estimates when no earlier result says better.
TYPICAL_S = {"m1": 120, "flat": 90, "m2": 20, "m3": 60, "m4": 60, "m5": 90, "m6": 45, "sweep": 100}
QUICK_S = 10.0
PROGRESS_EVERY = 15.0


def _estimates(out: Path, keys: list[str], quick: bool) -> dict[str, float]:
    """How long each figure took the last time it ran with the same plan size."""
    found = {
        r["figure"]: float(r["run"]["figure_s"])
        for r in report.load_results(out)
        if r.get("run", {}).get("figure_s") and bool(r["run"].get("quick")) == quick
    }
    return {k: found.get(k, QUICK_S if quick else TYPICAL_S.get(k, 60.0)) for k in keys}


class _Progress:
    """Which figures are done, how their pace compares with the estimates, what is left."""

    def __init__(self, estimates: dict[str, float]) -> None:
        self.estimates = estimates
        self.took: dict[str, float] = {}
        self.current = ""
        self.current_since = time.monotonic()

    def start(self, key: str) -> None:
        self.current, self.current_since = key, time.monotonic()

    def done(self, key: str, took: float) -> None:
        self.took[key] = took

    def line(self, elapsed: float) -> str:
        expected = sum(self.estimates[k] for k in self.took)
        actual = sum(self.took.values())
        # Slower than the estimates so far: the rest will be too, by as much; but
        # one figure whose plan changed since its estimate must not swing it far.
        pace = min(2.0, max(0.5, expected / actual)) if expected and actual else 1.0
        running = time.monotonic() - self.current_since
        left = sum(v for k, v in self.estimates.items() if k not in self.took and k != self.current)
        left += max(0.0, self.estimates.get(self.current, 0.0) - running * pace)
        return (
            f"[bench] {len(self.took)} of {len(self.estimates)} figures done; "
            f"{self.current} running for {progress.clock(running)}; "
            f"{progress.clock(elapsed)} elapsed; about {progress.clock(left / pace)} left "
            f"(pace {pace:.2f}x the estimates, from the last run of each figure)"
        )


async def _measure(
    keys: list[str], ctx: Context, out: Path, run: dict[str, Any], estimates: dict[str, float]
) -> bool:
    """Measure each figure in turn; write its JSON as soon as it is done. True if all went well."""
    tracker = _Progress(estimates)
    async with progress.ticking(tracker.line, PROGRESS_EVERY):
        return await _measure_each(keys, ctx, out, run, tracker)


async def _measure_each(
    keys: list[str], ctx: Context, out: Path, run: dict[str, Any], tracker: _Progress
) -> bool:
    clean = True
    for key in keys:
        figure = FIGURES[key]
        print(f"[bench] {key}: {figure.title} ...", flush=True)
        tracker.start(key)
        started = time.monotonic()
        try:
            result = await figure.measure(ctx)
        except Exception as exc:
            # A crash of one figure must not cost the others theirs.
            result = FigureResult(key, figure.title, error=traceback.format_exc())
            result.rows.append(error_row(figure.title, "", "—", f"harness crashed: {exc!r}"))
        finally:
            stop_all()
        took = time.monotonic() - started
        tracker.done(key, took)
        clean = clean and result.error is None
        data = result.to_json()
        data["run"] = {**run, "finished": runinfo.now(), "figure_s": round(took, 1)}
        report.write_figure(out, data)
        for row in result.rows:
            print(f"[bench]   {row.name}: {row.verdict} (ratio {row.ratio})", flush=True)
        if result.error:
            print(f"[bench]   error: {result.error.strip().splitlines()[-1]}", flush=True)
        print(f"[bench] {key} took {took:.0f} s", flush=True)
    return clean


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes KeyboardInterrupt, so that the same clean-up runs as for Ctrl-C.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the figures asked for, then rewrite the report from every result there is."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    pinned = _pin_self(argv)
    raise_nofile_limit()
    plan = Plan.quick() if args.quick else Plan()
    try:
        plan = plan.with_overrides(args.set)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    keys = args.figures or list(FIGURES)
    workdir = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    run = runinfo.record(pinned=pinned, quick=args.quick, plan=plan.as_dict(), figures=keys)
    estimates = _estimates(args.out, keys, args.quick)
    print(f"[bench] run {run['id']}: {', '.join(keys)}; logs in {workdir}", flush=True)
    if not pinned:
        print("[bench] warning: not pinned (taskset or two cores missing)", flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    clean = False
    try:
        clean = asyncio.run(_measure(keys, Context(plan, workdir), args.out, run, estimates))
    except KeyboardInterrupt:
        print("[bench] interrupted; stopping every server", flush=True)
        return 130
    finally:
        stop_all()
        if clean and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] logs kept in {workdir}", flush=True)
    took = time.monotonic() - started
    if not args.no_report:
        results = report.load_results(args.out)
        # The run's total time goes with the latest figure's run record.
        for result in results:
            if result.get("run", {}).get("id") == run["id"]:
                result["run"]["duration_s"] = took
                report.write_figure(args.out, result)
        report.write_docs(args.docs, results)
        if report.write_plot(args.plot, results):
            print(f"[bench] plot: {args.plot}", flush=True)
        print(f"[bench] table: {args.docs}", flush=True)
    print(f"[bench] done in {took / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
