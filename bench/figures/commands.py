"""M6 database commands per message sent and acknowledged (nx-27017, collection scope).

Two figures on the same servers, each with fresh pairs (``m6_pairs``),
between two snapshots of the server's command counts taken once the pairs
have identified (so that identification is left out) and once every sender
saw ``delivered`` for every message:

- burst: every sender sends ``m6_messages`` at once, so that a connection's
  frames, an inbox's inserts and the state transitions batch;
- steady: open loop at ``m6_steady_rate`` messages a second in all for
  ``m6_steady_duration`` seconds, slow enough that each message is handled
  alone, as traffic spread over time is. Sizing a deployment uses this one.

Counted: every command Tidings sends, ordinary cursors' ``getMore`` and
``killCursors`` included, but the change-stream machinery (its aggregate, and
the ``getMore`` and ``killCursors`` of its cursors) and the driver's own
(listed in ``NOT_COUNTED``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.figures.common import Context, join, reached
from bench.load import (
    LoadError,
    Pairs,
    RunResult,
    drive_offered,
    drive_throughput,
    open_pairs,
    run_tag,
    wait_acked,
)
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import NxServer, ServerFailed, TidingsServer

NAME = "M6 database commands per message, nx-27017, collection scope"
NAME_BURST = f"{NAME}, burst"
NAME_STEADY = f"{NAME}, steady"
NAME_DATABASE = "M6 database commands per message, database scope (on the fake beside it)"
TARGET = Target("<=", 2.0, on="measured", unit="commands")
# Change streams (their aggregate, and the getMore and killCursors of their
# cursors, as bench.server names them) and the driver's own traffic
# (handshakes, monitoring, sessions) are not what a message costs.
NOT_COUNTED = frozenset(
    {
        "aggregate$changeStream",
        "getMore$changeStream",
        "killCursors$changeStream",
        "hello",
        "isMaster",
        "ismaster",
        "ping",
        "buildInfo",
        "buildinfo",
        "endSessions",
        "saslStart",
        "saslContinue",
        "authenticate",
    }
)
# After the last ``delivered``, writes that follow it (none are expected) may land.
SETTLE = 0.5


async def _counted(
    ctx: Context, tidings: TidingsServer, window: int, drive: Any
) -> tuple[dict[str, int], dict[str, int], dict[str, int], int, bool, RunResult]:
    """Commands spent while ``drive(pairs)`` runs on fresh pairs, until all are acked."""
    plan = ctx.plan
    pairs: Pairs = await open_pairs(tidings.url, plan.m6_pairs, run_tag("m6"), window=window)
    try:
        await asyncio.sleep(SETTLE)
        before = await tidings.snapshot_commands()
        measured: RunResult = await drive(pairs)
        settled = await wait_acked(pairs, plan.drain)
        await asyncio.sleep(SETTLE)
        after = await tidings.snapshot_commands()
        acked = pairs.ledger.acked
    finally:
        await pairs.close()
    spent = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    counted = {n: c for n, c in spent.items() if c and n not in NOT_COUNTED}
    left_out = {n: c for n, c in spent.items() if c and n in NOT_COUNTED}
    return counted, left_out, before, acked, settled, measured


def _row(
    name: str,
    how: str,
    parts: tuple[dict[str, int], dict[str, int], dict[str, int], int, bool, RunResult],
) -> Row:
    counted, left_out, before, acked, settled, measured = parts
    per_message = sum(counted.values()) / acked if acked else None
    breakdown = (
        ", ".join(f"{n} {c / acked:.2f}" for n, c in sorted(counted.items())) if acked else ""
    )
    return Row(
        name,
        "commands/msg",
        per_message,
        None,
        "—",
        target=TARGET,
        status="ok" if settled and not measured.timed_out else "timeout",
        note=join(
            f"{acked} messages sent and acked, {how}",
            f"per message: {breakdown}" if breakdown else "",
            reached(measured),
        ),
        detail={
            "counted": counted,
            "not_counted": left_out,
            "identification": before,
            "messages_acked": acked,
            "run": {**measured.summary(), "acked": acked},
        },
        cpu={"generator": measured.loadgen_cpu},
    )


async def run(ctx: Context) -> FigureResult:
    """Measure M6, in a burst and at a steady rate."""
    plan = ctx.plan
    result = FigureResult(
        "m6",
        "M6 database commands",
        params={
            "pairs": plan.m6_pairs,
            "messages_per_sender": plan.m6_messages,
            "steady_rate_per_s": plan.m6_steady_rate,
            "steady_duration_s": plan.m6_steady_duration,
        },
    )
    try:
        async with NxServer(ctx.workdir) as nx, TidingsServer(ctx.workdir, nx.uri) as tidings:
            burst = await _counted(
                ctx,
                tidings,
                plan.m6_messages,
                lambda pairs: drive_throughput(pairs, plan.m6_messages, plan.m6_budget),
            )
            steady = await _counted(
                ctx,
                tidings,
                0,
                lambda pairs: drive_offered(
                    pairs, plan.m6_steady_rate, plan.m6_steady_duration, plan.drain
                ),
            )
    except (ServerFailed, LoadError) as exc:
        result.error = str(exc)
        for name in (NAME_BURST, NAME_STEADY):
            result.rows.append(error_row(name, "commands", "—", str(exc).splitlines()[0]))
        result.rows.append(_database_scope())
        return result
    result.rows.append(
        _row(NAME_BURST, f"{plan.m6_pairs} pairs each sending {plan.m6_messages} at once", burst)
    )
    result.rows.append(
        _row(
            NAME_STEADY,
            f"{plan.m6_steady_rate:g} msgs/s open loop over {plan.m6_pairs} pairs "
            f"for {plan.m6_steady_duration:g} s (one message at a time)",
            steady,
        )
    )
    result.rows.append(_database_scope())
    return result


def _database_scope() -> Row:
    return Row(
        NAME_DATABASE,
        "commands/msg",
        None,
        None,
        "—",
        status="skipped",
        note=(
            "not measured here: nx-27017 cannot watch a database. The commands counted are "
            "the store's writes and reads, which are the same in both scopes; the scope "
            "changes only the change-stream commands, which are not counted"
        ),
    )
