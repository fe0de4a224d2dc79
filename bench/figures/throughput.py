"""M1 throughput: messages delivered and acknowledged per second ÷ bare echo round trips per second.

Tidings (embedded store): ``m1_pairs`` sender→recipient pairs, each sender
sending ``m1_messages`` messages with at most ``m1_window`` in flight (sent,
not yet ``stored``); every recipient acks every message. The clock stops when
the last ``delivered`` (the state an ack produces) has reached its sender:
the work the figure names is then done. The rate at which messages were
delivered (the recipient has it and its sender saw ``stored``), the figure's
older clock, is kept beside it under that name.

Echo: ``m1_pairs`` connections, each round-tripping ``m1_echo_messages``
frames of the same shape through the same window.

Both are driven by ``bench.blast`` (a bare WebSocket client) from
``m1_generators`` processes on the load core, so that the server, not the
client, is what limits a run. Runs alternate between the two, each on a fresh
server, ``m1_repeats`` times; the ratio is the median of the per-run ratios,
with their spread. A side whose server used less than ``SATURATED_CPU`` of
its core (median over its runs) makes the row incomplete: its rate is then
not the server's.
"""

from __future__ import annotations

from typing import Any

from bench.figures.common import SATURATED_CPU, Context, join, median
from bench.fleet import FleetError, FleetResult, run_fleet
from bench.load import run_tag
from bench.result import FigureResult, Row, Status, Target, error_row
from bench.servers import EchoServer, ServerFailed, TidingsServer

NAME = "M1 throughput, embedded (msgs/s delivered and acknowledged)"
BASELINE = "bare echo round trips/s"


async def _drive(ctx: Context, mode: str, url: str, pid: int) -> FleetResult:
    plan = ctx.plan
    return await run_fleet(
        mode=mode,
        url=url,
        count=plan.m1_pairs,
        messages=plan.m1_messages if mode == "pairs" else plan.m1_echo_messages,
        window=plan.m1_window,
        tag=run_tag("m1"),
        processes=plan.m1_generators,
        budget=plan.m1_budget,
        server_pids=[pid],
    )


def _range(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else (None, None)


def _cpu_text(runs: list[dict[str, Any]], side: str) -> str:
    gen = _range([r["generator_cpu"] for r in runs])
    srv = _range([r["server_cpu"] for r in runs])
    if gen[0] is None or srv[0] is None:
        return ""
    return (
        f"{side}: load generator {gen[0]:.0%} to {gen[1]:.0%} of its core, "
        f"server {srv[0]:.0%} to {srv[1]:.0%} of its own"
    )


async def run(ctx: Context) -> FigureResult:
    """Measure M1."""
    plan = ctx.plan
    result = FigureResult(
        "m1",
        "M1 throughput",
        params={
            "pairs": plan.m1_pairs,
            "messages_per_sender": plan.m1_messages,
            "echo_frames_per_connection": plan.m1_echo_messages,
            "window": plan.m1_window,
            "repeats": plan.m1_repeats,
            "generator_processes": plan.m1_generators,
            "budget_s": plan.m1_budget,
        },
    )
    tidings_runs: list[dict[str, Any]] = []
    echo_runs: list[dict[str, Any]] = []
    try:
        for _ in range(plan.m1_repeats):
            # A fresh server each time: work a run leaves queued must not slow the next.
            async with TidingsServer(ctx.workdir) as tidings:
                ours = await _drive(ctx, "pairs", tidings.url, tidings.pid)
            async with EchoServer(ctx.workdir) as echo:
                theirs = await _drive(ctx, "echo", echo.url, echo.pid)
            tidings_runs.append(ours.summary())
            echo_runs.append(theirs.summary())
    except (ServerFailed, FleetError, TimeoutError) as exc:
        result.error = str(exc)
        if not tidings_runs:
            result.rows.append(error_row(NAME, "msgs/s", BASELINE, str(exc).splitlines()[0]))
            result.series = {"tidings": tidings_runs, "echo": echo_runs}
            return result
    ratios = [
        t["acked_per_s"] / e["acked_per_s"]
        for t, e in zip(tidings_runs, echo_runs, strict=True)
        if t["acked_per_s"] and e["acked_per_s"]
    ]
    low, high = _range(list(ratios))
    ours_cpu = median([r["server_cpu"] for r in tidings_runs])
    echo_cpu = median([r["server_cpu"] for r in echo_runs])
    unsaturated = [
        side
        for side, share in (("Tidings", ours_cpu), ("echo", echo_cpu))
        if share is None or share < SATURATED_CPU
    ]
    state: Status = "ok"
    if any(r["timed_out"] for r in tidings_runs + echo_runs) or len(ratios) < plan.m1_repeats:
        state = "timeout"
    elif unsaturated:
        state = "unsaturated"
    delivered = median([r["counted_per_s"] for r in tidings_runs])
    result.rows.append(
        Row(
            NAME,
            "msgs/s",
            median([r["acked_per_s"] for r in tidings_runs]),
            median([r["acked_per_s"] for r in echo_runs]),
            BASELINE,
            ratio=median(list(ratios)),
            target=Target(">=", 0.30),
            status=state,
            note=join(
                f"median of {len(ratios)} per-run ratio(s), spread {low:.3f} to {high:.3f}"
                if low is not None and high is not None
                else "",
                f"{plan.m1_pairs} pairs x {plan.m1_messages} msgs (echo: x "
                f"{plan.m1_echo_messages} frames), window {plan.m1_window}, "
                f"{plan.m1_generators} generator process(es)",
                f"delivered (recipient has it, sender saw stored) {delivered:,.0f} msgs/s"
                if delivered
                else "",
                _cpu_text(tidings_runs, "Tidings runs"),
                _cpu_text(echo_runs, "echo runs"),
                f"server under {SATURATED_CPU:.0%} of its core (median): {', '.join(unsaturated)}"
                if unsaturated
                else "",
            ),
            detail={"tidings_runs": tidings_runs, "echo_runs": echo_runs, "ratios": ratios},
            cpu={
                "generator": median([r["generator_cpu"] for r in tidings_runs]),
                "server": ours_cpu,
                "echo_generator": median([r["generator_cpu"] for r in echo_runs]),
                "echo_server": echo_cpu,
            },
        )
    )
    return result
