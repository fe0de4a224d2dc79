"""M6 database commands per message sent and acknowledged (nx-27017, collection scope).

``m6_pairs`` pairs identify; the server's command counts are snapshotted (so
that identification is left out); every sender sends ``m6_messages`` at once
and every recipient acks each; once every sender saw ``delivered``, a second
snapshot. Counted: every command Tidings sends but the change-stream
machinery and the driver's own (listed in ``NOT_COUNTED``).
"""

from __future__ import annotations

import asyncio

from bench.figures.common import Context, join, reached
from bench.load import LoadError, drive_throughput, open_pairs, run_tag, wait_acked
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import NxServer, ServerFailed, TidingsServer

NAME = "M6 database commands per message, nx-27017, collection scope"
NAME_DATABASE = "M6 database commands per message, database scope (on the fake beside it)"
TARGET = Target("<=", 2.0, on="measured", unit="commands")
# Change streams (their aggregate, getMore, killCursors) and the driver's own
# traffic (handshakes, monitoring, sessions) are not what a message costs.
NOT_COUNTED = frozenset(
    {
        "aggregate$changeStream",
        "getMore",
        "killCursors",
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


async def run(ctx: Context) -> FigureResult:
    """Measure M6."""
    plan = ctx.plan
    result = FigureResult(
        "m6",
        "M6 database commands",
        params={"pairs": plan.m6_pairs, "messages_per_sender": plan.m6_messages},
    )
    try:
        async with NxServer(ctx.workdir) as nx, TidingsServer(ctx.workdir, nx.uri) as tidings:
            pairs = await open_pairs(
                tidings.url, plan.m6_pairs, run_tag("m6"), window=plan.m6_messages
            )
            try:
                await asyncio.sleep(SETTLE)
                before = await tidings.snapshot_commands()
                measured = await drive_throughput(pairs, plan.m6_messages, plan.m6_budget)
                settled = await wait_acked(pairs, plan.drain)
                await asyncio.sleep(SETTLE)
                after = await tidings.snapshot_commands()
                acked = pairs.ledger.acked
            finally:
                await pairs.close()
    except (ServerFailed, LoadError) as exc:
        result.error = str(exc)
        result.rows.append(error_row(NAME, "commands", "—", str(exc).splitlines()[0]))
        result.rows.append(_database_scope())
        return result
    spent = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    counted = {n: c for n, c in spent.items() if c and n not in NOT_COUNTED}
    left_out = {n: c for n, c in spent.items() if c and n in NOT_COUNTED}
    per_message = sum(counted.values()) / acked if acked else None
    breakdown = (
        ", ".join(f"{n} {c / acked:.2f}" for n, c in sorted(counted.items())) if acked else ""
    )
    result.rows.append(
        Row(
            NAME,
            "commands/msg",
            per_message,
            None,
            "—",
            target=TARGET,
            status="ok" if settled and not measured.timed_out else "timeout",
            note=join(
                f"{acked} messages sent and acked by {plan.m6_pairs} pairs at once",
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
