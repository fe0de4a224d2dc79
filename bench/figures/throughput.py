"""M1 throughput: delivered messages per second ÷ bare echo round trips per second.

Tidings (embedded store): ``m1_pairs`` sender→recipient pairs, each sender
sending ``m1_messages`` messages with at most ``m1_window`` in flight (sent,
not yet ``stored``); every recipient acks every message. A message counts once
its recipient has it and its sender saw ``stored``.

Echo: ``m1_pairs`` connections, each round-tripping ``m1_messages`` frames of
the same shape through the same window. Runs alternate between the two, each
on a fresh server, ``m1_repeats`` times, and the medians are compared.
"""

from __future__ import annotations

from typing import Any

from bench.figures.common import Context, generator_note, join, median, reached, status
from bench.load import LoadError, drive_echo, drive_throughput, open_pairs, run_tag
from bench.proc import CpuMeter
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import EchoServer, ServerFailed, TidingsServer

NAME = "M1 throughput, embedded (delivered msgs/s)"
BASELINE = "bare echo round trips/s"


async def _tidings_run(tidings: TidingsServer, ctx: Context) -> dict[str, Any]:
    """One run of the pairs against ``tidings``; its summary."""
    plan = ctx.plan
    pairs = await open_pairs(tidings.url, plan.m1_pairs, run_tag("m1"), plan.m1_window)
    meter = CpuMeter(tidings.pid)
    try:
        meter.start()
        measured = await drive_throughput(pairs, plan.m1_messages, plan.m1_budget)
        server_cpu = meter.stop()
    finally:
        await pairs.close()
    return {**measured.summary(), "server_cpu": server_cpu, "note": reached(measured)}


async def run(ctx: Context) -> FigureResult:
    """Measure M1."""
    plan = ctx.plan
    result = FigureResult(
        "m1",
        "M1 throughput",
        params={
            "pairs": plan.m1_pairs,
            "messages_per_sender": plan.m1_messages,
            "window": plan.m1_window,
            "repeats": plan.m1_repeats,
            "budget_s": plan.m1_budget,
        },
    )
    tidings_runs: list[dict[str, Any]] = []
    echo_runs: list[dict[str, Any]] = []
    try:
        for _ in range(plan.m1_repeats):
            # A fresh server each time: work a run leaves queued (the server may
            # store far faster than it delivers) must not slow the next one.
            async with TidingsServer(ctx.workdir) as tidings:
                tidings_runs.append(await _tidings_run(tidings, ctx))
            async with EchoServer(ctx.workdir) as echo:
                meter = CpuMeter(echo.pid)
                meter.start()
                base = await drive_echo(
                    echo.url, plan.m1_pairs, plan.m1_messages, plan.m1_window, plan.m1_budget
                )
                echo_runs.append({**base.summary(), "server_cpu": meter.stop()})
    except (ServerFailed, LoadError) as exc:
        result.error = str(exc)
        if not tidings_runs or not echo_runs:
            result.rows.append(error_row(NAME, "msgs/s", BASELINE, str(exc).splitlines()[0]))
            result.series = {"tidings": tidings_runs, "echo": echo_runs}
            return result
    measured_rate = median([r["rate_per_s"] for r in tidings_runs])
    baseline_rate = median([r["rate_per_s"] for r in echo_runs])
    timed_out = any(r["timed_out"] for r in tidings_runs + echo_runs)
    result.rows.append(
        Row(
            NAME,
            "msgs/s",
            measured_rate,
            baseline_rate,
            BASELINE,
            target=Target(">=", 0.30),
            status=status(timed_out, len(tidings_runs) < plan.m1_repeats),
            note=join(
                f"median of {len(tidings_runs)} run(s); {plan.m1_pairs} pairs x "
                f"{plan.m1_messages} msgs, window {plan.m1_window}",
                "; ".join(r["note"] for r in tidings_runs if r["note"]),
                generator_note(*(r["loadgen_cpu"] for r in tidings_runs), side="Tidings runs"),
                # A generator-bound baseline is understated, and the ratio overstated.
                generator_note(*(r["loadgen_cpu"] for r in echo_runs), side="echo runs"),
            ),
            detail={"tidings_runs": tidings_runs, "echo_runs": echo_runs},
        )
    )
    return result
