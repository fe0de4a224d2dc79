"""M2 store path on nx-27017: ``stored`` acks/s ÷ a bare ``insert_one`` loop.

Tidings: ``m2_senders`` senders, pipelined (``m2_window`` in flight each), to
recipients that identified once and left, so that only the path to ``stored``
is measured (no delivery). Bare: as many concurrent tasks, each an
``insert_one`` loop into a collection of its own with Tidings' indexes, run in
Tidings' seat on the server core against the same nx-27017.
"""

from __future__ import annotations

import asyncio

from bench.bare import BareFailed, run_bare
from bench.figures.common import Context, generator_note, join, reached, status
from bench.load import LoadError, drive_throughput, open_pairs, run_tag
from bench.proc import CpuMeter
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import NxServer, ServerFailed, TidingsServer

NAME = "M2 store path, nx-27017 (stored acks/s)"
BASELINE = "bare insert_one/s, same concurrency"


async def run(ctx: Context) -> FigureResult:
    """Measure M2."""
    plan = ctx.plan
    result = FigureResult(
        "m2",
        "M2 store path",
        params={
            "senders": plan.m2_senders,
            "messages_per_sender": plan.m2_messages,
            "window": plan.m2_window,
            "budget_s": plan.m2_budget,
        },
    )
    try:
        async with NxServer(ctx.workdir) as nx:
            async with TidingsServer(ctx.workdir, nx.uri) as tidings:
                pairs = await open_pairs(
                    tidings.url, plan.m2_senders, run_tag("m2"), plan.m2_window
                )
                try:
                    # Recipients exist but are offline: the store path alone.
                    await asyncio.gather(*(r.close() for r in pairs.recipients))
                    meter = CpuMeter(tidings.pid)
                    meter.start()
                    measured = await drive_throughput(
                        pairs, plan.m2_messages, plan.m2_budget, measure="stored"
                    )
                    server_cpu = meter.stop()
                finally:
                    await pairs.close()
            bare = await run_bare(
                "insert",
                nx.uri,
                "barem2",
                plan.m2_budget + 60,
                tasks=plan.m2_senders,
                count=plan.m2_messages,
                budget=plan.m2_budget,
            )
    except (ServerFailed, LoadError, BareFailed) as exc:
        result.error = str(exc)
        result.rows.append(error_row(NAME, "msgs/s", BASELINE, str(exc).splitlines()[0]))
        return result
    summary = measured.summary()
    summary["server_cpu"] = server_cpu
    result.rows.append(
        Row(
            NAME,
            "msgs/s",
            measured.rate,
            float(bare["rate_per_s"]),
            BASELINE,
            target=Target(">=", 1.0),
            status=status(measured.timed_out, bool(bare["timed_out"])),
            note=join(
                f"{plan.m2_senders} senders x {plan.m2_messages}, window {plan.m2_window}; "
                f"bare: {plan.m2_senders} tasks",
                reached(measured),
                generator_note(measured.loadgen_cpu),
            ),
            detail={"tidings": summary, "bare": bare},
        )
    )
    return result
