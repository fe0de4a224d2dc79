"""M5 memory: server RSS per idle identified connection ÷ the echo app's per idle connection.

Tidings (embedded store): after a warm-up of a few connections that come and
go, VmRSS is read; ``m5_connections`` connections open and identify (fresh
e-mails), held by load-generator workers on the load core; VmRSS again; the
difference ÷ the connections open. Then more, up to ``m5_hold``, and a sample
of them must still answer ``#ping`` for the held row to pass: an open socket
the server no longer serves is not a connection held.

Echo: the same, with as many connections as Tidings reached, each having
round-tripped one frame.

On the embedded store each fresh user also leaves its records in the server's
memory (user document, presence record, an empty collection with its
indexes): they are part of the figure, as they would not be on MongoDB.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from bench.figures.common import Context, join
from bench.hold import HoldPool
from bench.load import LoadError, close_all, open_clients, run_tag
from bench.proc import rss_kib
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import EchoServer, ServerFailed, TidingsServer

NAME_RATIO = "M5 RSS per idle identified connection, embedded ÷ echo"
NAME_KIB = "M5 RSS per idle identified connection, embedded"
NAME_HOLD = "M5 idle identified connections held"
WARM_UP = 20
# Let the server finish with the last connections before reading its RSS.
SETTLE = 2.0
SAMPLE = 300


async def _warm_up(url: str, identify: bool) -> None:
    """A few connections that come and go, so that first-use costs are paid before."""
    clients = await open_clients(url, [f"warm{i}" for i in range(WARM_UP)], 15)
    try:
        tag = run_tag("warm")
        for i, client in enumerate(clients):
            if identify:
                await client.identify(f"{tag}-{i}@bench.test", _ignore)
            else:
                client.send({"type": "#ping"})
    finally:
        await close_all(clients)
    await asyncio.sleep(SETTLE)


def _ignore(frame: dict[str, Any]) -> None:
    """Idle connections read nothing."""


async def _per_connection(pid: int, pool: HoldPool, count: int, budget: float) -> dict[str, Any]:
    before = rss_kib(pid)
    opened = await pool.open(count, budget)
    await asyncio.sleep(SETTLE)
    after = rss_kib(pid)
    n = int(opened["open"])
    per = (after - before) / n if before is not None and after is not None and n else None
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "connections": n,
        "per_connection_kib": per,
        "timed_out": bool(opened["timed_out"]),
        "errors": opened["errors"],
    }


async def run(ctx: Context) -> FigureResult:
    """Measure M5."""
    plan = ctx.plan
    result = FigureResult(
        "m5",
        "M5 memory",
        params={
            "connections": plan.m5_connections,
            "hold": plan.m5_hold,
            "per_worker": plan.m5_per_worker,
            "budget_s": plan.m5_budget,
            "hold_budget_s": plan.m5_hold_budget,
        },
    )
    workers = math.ceil(plan.m5_hold / plan.m5_per_worker)
    try:
        async with TidingsServer(ctx.workdir) as tidings:
            await _warm_up(tidings.url, identify=True)
            pool = HoldPool(tidings.url, "tidings", run_tag("m5"), workers)
            await pool.start()
            try:
                ours = await _per_connection(tidings.pid, pool, plan.m5_connections, plan.m5_budget)
                more = await pool.open(
                    max(0, plan.m5_hold - ours["connections"]), plan.m5_hold_budget
                )
                await asyncio.sleep(SETTLE)
                check = await pool.check(SAMPLE)
                held = {
                    **check,
                    "attempted": plan.m5_hold,
                    "timed_out": bool(more["timed_out"]),
                    "errors": more["errors"],
                    "rss_kib": rss_kib(tidings.pid),
                    "server_alive": tidings.alive(),
                }
            finally:
                await pool.close()
        async with EchoServer(ctx.workdir) as echo:
            await _warm_up(echo.url, identify=False)
            pool = HoldPool(echo.url, "echo", run_tag("m5e"), workers)
            await pool.start()
            try:
                # As many as Tidings reached, so that both figures are per the same N.
                theirs = await _per_connection(
                    echo.pid, pool, max(1, ours["connections"]), plan.m5_budget
                )
            finally:
                await pool.close()
    except (ServerFailed, LoadError, RuntimeError, TimeoutError) as exc:
        result.error = str(exc)
        for name in (NAME_RATIO, NAME_KIB, NAME_HOLD):
            result.rows.append(error_row(name, "KiB", "echo", str(exc).splitlines()[0]))
        return result
    short = ours["connections"] < plan.m5_connections
    reached = (
        f"{ours['connections']:,} of {plan.m5_connections:,} connections within "
        f"{plan.m5_budget:g} s"
        if short
        else f"{ours['connections']:,} connections"
    )
    detail = {"tidings": ours, "echo": theirs, "hold": held}
    result.rows.append(
        Row(
            NAME_RATIO,
            "KiB/conn",
            ours["per_connection_kib"],
            theirs["per_connection_kib"],
            "echo app, KiB per idle connection",
            target=Target("<=", 1.25),
            status="timeout" if short else "ok",
            note=reached,
            detail=detail,
        )
    )
    result.rows.append(
        Row(
            NAME_KIB,
            "KiB/conn",
            ours["per_connection_kib"],
            theirs["per_connection_kib"],
            "echo app, KiB per idle connection",
            target=Target("<=", 32, on="measured", unit="KiB"),
            status="timeout" if short else "ok",
            note=join(reached, "includes each fresh user's records in the embedded store"),
        )
    )
    # Open is not held: a connection counts only if the server still serves it,
    # so every sampled one must answer, and the sample must not be empty.
    answering = held["checked"] > 0 and held["ok"] == held["checked"]
    unmet = join(
        ""
        if answering
        else f"only {held['ok']} of {held['checked']} sampled connections answered #ping",
        "" if held["server_alive"] else "the server died",
    )
    result.rows.append(
        Row(
            NAME_HOLD,
            "connections",
            float(held["open"]),
            None,
            "—",
            target=Target(">=", plan.m5_hold, on="measured", unit="open, sample answering"),
            status="timeout" if held["timed_out"] else "ok",
            unmet=unmet,
            note=join(
                f"{held['open']:,} of {plan.m5_hold:,} open"
                + (f" (bound {plan.m5_hold_budget:g} s hit)" if held["timed_out"] else ""),
                f"{held['ok']} of {held['checked']} sampled answered #ping",
                f"server RSS {held['rss_kib'] / 1024:.0f} MiB" if held["rss_kib"] else "",
                unmet,
            ),
        )
    )
    return result
