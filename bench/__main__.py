"""``python -m bench [FIGURE ...]``: measure, write the JSON, the table and the plot.

Figures: m1, flat, m2, m3, m4, m5, m6, sweep (all of them when none is named).
The harness re-executes itself under ``taskset -c 1`` (the load-generator
core) unless it already runs there; the servers it starts run under
``taskset -c 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench import machine, report
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


def _source() -> dict[str, Any]:
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
    if origin is not None:
        git = shutil.which("git")
        if git is not None:
            try:
                info["commit"] = subprocess.run(
                    [git, "rev-parse", "--short", "HEAD"],
                    cwd=origin,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=10,
                ).stdout.strip()
                status = subprocess.run(
                    [git, "status", "--porcelain", "--", "."],
                    cwd=origin,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=10,
                ).stdout
                info["dirty"] = bool(status.strip())
            except (OSError, subprocess.SubprocessError):
                info["commit"] = "not a git checkout"
    return info


async def _measure(keys: list[str], ctx: Context, out: Path, run: dict[str, Any]) -> bool:
    """Measure each figure in turn; write its JSON as soon as it is done. True if all went well."""
    clean = True
    for key in keys:
        figure = FIGURES[key]
        print(f"[bench] {key}: {figure.title} ...", flush=True)
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
        clean = clean and result.error is None
        data = result.to_json()
        data["run"] = {**run, "finished": _now(), "figure_s": round(took, 1)}
        report.write_figure(out, data)
        for row in result.rows:
            print(f"[bench]   {row.name}: {row.verdict} (ratio {row.ratio})", flush=True)
        if result.error:
            print(f"[bench]   error: {result.error.strip().splitlines()[-1]}", flush=True)
        print(f"[bench] {key} took {took:.0f} s", flush=True)
    return clean


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    run: dict[str, Any] = {
        "id": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "started": _now(),
        "machine": machine.describe(),
        "source": _source(),
        "pinned": pinned,
        "quick": args.quick,
        "plan": plan.as_dict(),
        "figures": keys,
    }
    print(f"[bench] run {run['id']}: {', '.join(keys)}; logs in {workdir}", flush=True)
    if not pinned:
        print("[bench] warning: not pinned (taskset or two cores missing)", flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    clean = False
    try:
        clean = asyncio.run(_measure(keys, Context(plan, workdir), args.out, run))
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
