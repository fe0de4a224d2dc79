"""Latency figures: M3 (against the database's own), M4 (fan-out) and the load sweep.

Every one of them is open loop: messages are sent at a fixed rate, round-robin
over the senders, whatever the server answers, and latency runs from when a
message was due to be sent to when its recipient read it (recipients ack every
message). A run that does not deliver everything within its drain bound is
reported as incomplete, with what was delivered.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bench.bare import BareFailed, run_bare
from bench.figures.common import SATURATED_CPU, Context, generator_note, join, status
from bench.load import (
    LoadError,
    RunResult,
    close_all,
    drive_offered,
    open_identified,
    open_pairs,
    percentile,
    run_tag,
    wait_acked,
)
from bench.proc import CpuMeter
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import NxServer, ServerFailed, TidingsServer

M3_P50 = "M3 latency p50, nx-27017 (send→recipient)"
M3_P99 = "M3 latency p99, nx-27017 (send→recipient)"
M3_BASELINE = "bare insert→change event, same nx-27017"
M4_NAME = "M4 fan-out, embedded: delivery p99 with many idle users"
# A step of the sweep that delivers less than this share of its offered load
# is saturated; higher steps would only take longer to say the same.
SATURATION = 0.8
# Between sweep steps, how long the server may take to finish the last one's acks.
STEP_SETTLE = 5.0


def _total(shares: list[float | None]) -> float | None:
    """The server core's share: its processes' shares added (None if one is missing)."""
    if any(s is None for s in shares):
        return None
    return round(sum(s for s in shares if s is not None), 3)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


async def _offered(
    url: str,
    pairs: int,
    rate: float,
    duration: float,
    drain: float,
    server_pids: tuple[int, ...] = (),
) -> RunResult:
    """One open-loop run on fresh pairs, closed afterwards.

    With ``server_pids``, ``server_cpu`` is their share of the server core while
    the load ran (setting up and closing the pairs left out).
    """
    group = await open_pairs(url, pairs, run_tag("lat"), window=0)
    try:
        meters = [CpuMeter(pid) for pid in server_pids]
        for meter in meters:
            meter.start()
        result = await drive_offered(group, rate, duration, drain)
        result.server_cpu = _total([m.stop() for m in meters]) if meters else None
        await wait_acked(group, STEP_SETTLE)
        result.acked = group.ledger.acked
        return result
    finally:
        await group.close()


async def run_m3(ctx: Context) -> FigureResult:
    """Measure M3: Tidings' latency on nx-27017 ÷ nx-27017's own insert→change event."""
    plan = ctx.plan
    result = FigureResult(
        "m3",
        "M3 latency",
        params={"pairs": plan.m3_pairs, "rate_per_s": plan.m3_rate, "duration_s": plan.m3_duration},
    )
    try:
        async with NxServer(ctx.workdir) as nx:
            async with TidingsServer(ctx.workdir, nx.uri) as tidings:
                measured = await _offered(
                    tidings.url, plan.m3_pairs, plan.m3_rate, plan.m3_duration, plan.drain
                )
            bare = await run_bare(
                "watch",
                nx.uri,
                "barem3",
                plan.m3_duration + plan.drain + 60,
                rate=plan.m3_rate,
                duration=plan.m3_duration,
                drain=plan.drain,
                # As many streams as Tidings follows in collection scope: one
                # per identified user, senders and recipients.
                streams=2 * plan.m3_pairs,
            )
    except (ServerFailed, LoadError, BareFailed) as exc:
        result.error = str(exc)
        for name in (M3_P50, M3_P99):
            result.rows.append(error_row(name, "ms", M3_BASELINE, str(exc).splitlines()[0]))
        return result
    latencies = measured.latencies
    shape = (
        f"{plan.m3_rate:g} msgs/s over {plan.m3_pairs} pairs for {plan.m3_duration:g} s; "
        f"{measured.counted} of {measured.expected} delivered; bare: "
        f"{bare['received']} of {bare['expected']}, polling {bare.get('streams', 1)} streams"
    )
    for name, q, key, bound in ((M3_P50, 50, "p50_ms", 1.2), (M3_P99, 99, "p99_ms", 1.5)):
        ours = _ms(percentile(latencies, q))
        theirs = bare[key]
        added = f"+{ours - theirs:.1f} ms" if ours is not None and theirs is not None else ""
        result.rows.append(
            Row(
                name,
                "ms",
                ours,
                theirs,
                M3_BASELINE,
                target=Target("<=", bound),
                status=status(measured.timed_out, bool(bare["timed_out"])),
                note=join(added, shape, generator_note(measured.loadgen_cpu)),
                detail={"tidings": measured.summary(), "bare": bare},
            )
        )
    return result


async def run_m4(ctx: Context) -> FigureResult:
    """Measure M4: delivery p99 with many idle identified users ÷ with few."""
    plan = ctx.plan
    result = FigureResult(
        "m4",
        "M4 fan-out",
        params={
            "pairs": plan.m4_pairs,
            "rate_per_s": plan.m4_rate,
            "duration_s": plan.m4_duration,
            "idle_few": plan.m4_idle_few,
            "idle_many": plan.m4_idle_many,
        },
    )
    runs: dict[int, dict[str, Any]] = {}
    try:
        for idle in (plan.m4_idle_few, plan.m4_idle_many):
            async with TidingsServer(ctx.workdir) as tidings:
                clients, short = await open_identified(
                    tidings.url, idle, run_tag("idle"), plan.m4_idle_budget
                )
                try:
                    measured = await _offered(
                        tidings.url, plan.m4_pairs, plan.m4_rate, plan.m4_duration, plan.drain
                    )
                finally:
                    await close_all(clients)
            summary = measured.summary()
            summary["idle_connected"] = len(clients)
            summary["idle_short"] = short
            runs[idle] = summary
    except (ServerFailed, LoadError) as exc:
        result.error = str(exc)
        result.rows.append(error_row(M4_NAME, "ms", "with few", str(exc).splitlines()[0]))
        return result
    many, few = runs[plan.m4_idle_many], runs[plan.m4_idle_few]
    result.rows.append(
        Row(
            M4_NAME,
            "ms",
            many["p99_ms"],
            few["p99_ms"],
            f"same with {plan.m4_idle_few} idle users",
            target=Target("<=", 1.5),
            status=status(
                many["timed_out"], few["timed_out"], many["idle_short"], few["idle_short"]
            ),
            note=join(
                f"{many['idle_connected']} vs {few['idle_connected']} idle identified users; "
                f"{plan.m4_rate:g} msgs/s over {plan.m4_pairs} pairs for {plan.m4_duration:g} s",
                f"p50 {many['p50_ms']} vs {few['p50_ms']} ms",
                "idle users: fewer than planned within the bound"
                if many["idle_short"] or few["idle_short"]
                else "",
            ),
            detail={"many": many, "few": few},
        )
    )
    return result


@contextlib.asynccontextmanager
async def _server(ctx: Context, store: str) -> AsyncIterator[tuple[TidingsServer, list[int]]]:
    """Tidings on ``store``, and the processes of the server core (Tidings, nx-27017)."""
    if store == "embedded":
        async with TidingsServer(ctx.workdir) as tidings:
            yield tidings, [tidings.pid]
        return
    async with NxServer(ctx.workdir) as nx, TidingsServer(ctx.workdir, nx.uri) as tidings:
        yield tidings, [tidings.pid, nx.pid]


def _knee(steps: list[dict[str, Any]]) -> tuple[str, dict[str, float | None]]:
    """Which side was at its limit at the knee (the first saturated step, else the last)."""
    knee = next((s for s in steps if s["saturated"]), steps[-1] if steps else None)
    if knee is None:
        return "", {}
    gen, server = knee.get("loadgen_cpu"), knee.get("server_cpu")
    if gen is not None and gen >= SATURATED_CPU:
        who = "the load generator saturated"
    elif server is not None and server >= SATURATED_CPU:
        who = "the server core saturated"
    else:
        who = f"neither side reached {SATURATED_CPU:.0%} of its core"
    shares = f"load generator {gen:.0%}, server core {server:.0%}" if gen and server else ""
    return (
        f"at {knee['offered_per_s']:g}/s ({'saturated' if knee['saturated'] else 'highest'}): "
        f"{join(shares, who)}",
        {"generator": gen, "server": server},
    )


async def run_sweep(ctx: Context) -> FigureResult:
    """p50/p99 latency at rising offered loads, embedded and nx-27017, for the plot."""
    plan = ctx.plan
    result = FigureResult(
        "sweep",
        "Latency against offered load",
        params={
            "pairs": plan.sweep_pairs,
            "rates_per_s": list(plan.sweep_rates),
            "rates_per_s_nx": list(plan.sweep_rates_nx),
            "duration_s": plan.sweep_duration,
            "drain_s": plan.drain,
        },
    )
    for store in ("embedded", "nx-27017"):
        steps: list[dict[str, Any]] = []
        result.series[store] = steps
        try:
            async with _server(ctx, store) as (tidings, pids):
                rates = plan.sweep_rates if store == "embedded" else plan.sweep_rates_nx
                for rate in rates:
                    measured = await _offered(
                        tidings.url,
                        plan.sweep_pairs,
                        rate,
                        plan.sweep_duration,
                        plan.drain,
                        tuple(pids),
                    )
                    delivered = measured.rate or 0.0
                    saturated = measured.timed_out or delivered < SATURATION * rate
                    steps.append(
                        {
                            **measured.summary(),
                            "offered_per_s": rate,
                            "saturated": saturated,
                            "server_cpu": measured.server_cpu,
                        }
                    )
                    if saturated:
                        break
        except (ServerFailed, LoadError) as exc:
            result.error = join(result.error or "", f"{store}: {exc}")
        complete = [s for s in steps if not s["saturated"]]
        knee, cpu = _knee(steps)
        result.rows.append(
            Row(
                f"Latency sweep, {store}: highest offered load before saturation",
                "msgs/s",
                max((s["offered_per_s"] for s in complete), default=None),
                None,
                "—",
                status="ok" if steps else "error",
                note=join(
                    knee,
                    "; ".join(
                        f"{s['offered_per_s']:g}/s: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms"
                        + (" (saturated)" if s["saturated"] else "")
                        for s in steps
                    ),
                ),
                cpu=cpu,
            )
        )
    return result
