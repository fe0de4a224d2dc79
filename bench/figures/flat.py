"""Flat inbox: do a recipient's operations stay as fast when the inbox is large?

One recipient's inbox is preloaded over the wire (pipelined senders, the
recipient online and acking every message as it comes, without waiting), up
to ``flat_preload`` messages or ``flat_preload_budget`` seconds (``…_nx`` on
nx-27017), whichever
comes first; then ``flat_pending`` more that it does not ack. A fresh
recipient gets only the ``flat_pending`` unacked ones: the empty inbox.
Then, alternating flat and empty:

(b) identify with a backlog: connect, identify, hold the ``flat_pending``
    backlog messages; ``flat_identifies`` times each;
(a) ``stored`` acks/s for ``flat_sends`` new messages to the (offline)
    recipient, the median of ``flat_rounds`` alternating rounds (on nx-27017
    one round of ``flat_sends_nx``);
(c) acks/s: the recipient identifies, takes its whole backlog, acks all of it
    at once; until its sender saw ``delivered`` for each.

Each is a rate on the flat inbox ÷ the same rate on the empty one. On
nx-27017 the same queries are also timed bare (``bench.bare flat``) on a
collection of as many documents, and ours is divided by nx's own ratio.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from bench.bare import BareFailed, run_bare
from bench.figures.common import Context, join, median
from bench.load import (
    CONNECT_TIMEOUT,
    IDENTIFY_TIMEOUT,
    Client,
    Frame,
    Ledger,
    LoadError,
    Recipient,
    Sender,
    close_all,
    identify_all,
    identify_with_backlog,
    now,
    open_clients,
    run_tag,
)
from bench.result import FigureResult, Row, Target, error_row
from bench.servers import NxServer, ServerFailed, TidingsServer

CONTENT = "hello from the load generator"
TARGET = Target(">=", 0.9)
OPERATIONS = {
    "stored": "(a) stored acks/s",
    "identify": "(b) identify + 100 backlog/s",
    "ack": "(c) acks/s",
}


@dataclass
class Measure:
    """Rates on the flat and the empty inbox, and how the preload went."""

    preload_target: int
    preload_budget: float
    preloaded: int = 0
    preload_acked: int = 0
    preload_s: float = 0.0
    preload_short: bool = False
    rates: dict[str, dict[str, float | None]] = field(
        default_factory=lambda: {"flat": {}, "empty": {}}
    )
    timed_out: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def incomplete(self, op: str) -> bool:
        """Whether operation ``op`` (or the preload before it) hit a bound."""
        before = ("preload", "pending")
        return self.preload_short or any(
            v for k, v in self.timed_out.items() if k.startswith(op) or k in before
        )

    def ratio(self, op: str) -> float | None:
        flat, empty = self.rates["flat"].get(op), self.rates["empty"].get(op)
        return flat / empty if flat is not None and empty else None

    def summary(self) -> dict[str, Any]:
        return {
            "preload_target": self.preload_target,
            "preloaded": self.preloaded,
            "preload_acked": self.preload_acked,
            "preload_s": round(self.preload_s, 2),
            "preload_short": self.preload_short,
            "rates": self.rates,
            "timed_out": self.timed_out,
            "notes": self.notes,
        }


async def _stored_rate(
    sender: Sender, to: str, prefix: str, count: int, budget: float
) -> tuple[float | None, bool]:
    """``stored`` per second for ``count`` pipelined sends to ``to``."""
    ledger = sender.ledger
    before = ledger.stored + ledger.failed
    started = now()
    deadline = started + budget

    async def pump() -> None:
        for i in range(count):
            if not await sender.send(f"{prefix}{i}", deadline, to):
                return

    task = asyncio.create_task(pump())
    done = await ledger.wait(lambda: ledger.stored + ledger.failed - before >= count, deadline)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stored = [
        r.stored
        for i in range(count)
        if (r := ledger.records.get((sender.email, f"{prefix}{i}"))) and r.stored is not None
    ]
    if not stored:
        return None, True
    return len(stored) / max(max(stored) - started, 1e-6), not done


async def _ack_rate(
    url: str, email: str, expected: int, ledger: Ledger, sender: str, budget: float
) -> tuple[float | None, int, bool]:
    """Take the whole backlog (``expected`` messages), then ack all of it at once:
    acks/s until the sender saw ``delivered`` for each. Returns the rate, how
    many were acked, and whether a bound was hit."""
    client = await Client.open(url, f"acker:{email}", CONNECT_TIMEOUT)
    ids: list[str] = []
    full = asyncio.Event()

    def collect(frame: Frame) -> None:
        if frame.get("type") == "message":
            ids.append(str(frame.get("id")))
            if len(ids) >= expected:
                full.set()

    try:
        await client.identify(email, collect, budget)
        try:
            await asyncio.wait_for(full.wait(), budget)
        except TimeoutError:
            return None, len(ids), True
        before = ledger.acked
        started = now()
        for mid in ids:
            client.send({"type": "ack", "id": mid})
        done = await ledger.wait(lambda: ledger.acked - before >= len(ids), started + budget)
        acked = [
            r.acked
            for mid in ids
            if (r := ledger.records.get((sender, mid))) and r.acked is not None
        ]
        if not acked:
            return None, len(ids), True
        return len(acked) / max(max(acked) - started, 1e-6), len(ids), not done
    finally:
        await client.close()


async def measure(ctx: Context, mongodb_uri: str | None) -> Measure:
    """Preload, then measure (b), (a), (c) on the flat and the empty inbox."""
    plan = ctx.plan
    pending = plan.flat_pending
    budget = plan.flat_preload_budget if mongodb_uri is None else plan.flat_preload_budget_nx
    sends = plan.flat_sends if mongodb_uri is None else plan.flat_sends_nx
    rounds = plan.flat_rounds if mongodb_uri is None else 1
    result = Measure(preload_target=plan.flat_preload, preload_budget=budget)
    async with TidingsServer(ctx.workdir, mongodb_uri) as server:
        url = server.url
        tag = run_tag("flat")
        flat, empty = f"{tag}-flat@bench.test", f"{tag}-empty@bench.test"
        main_email = f"{tag}-main@bench.test"
        ledger = Ledger()
        loader_emails = [f"{tag}-s{i}@bench.test" for i in range(plan.flat_preload_senders)]
        clients = await open_clients(
            url, [flat, empty, main_email, *loader_emails], CONNECT_TIMEOUT
        )
        flat_client, empty_client, main_client = clients[:3]
        loader_clients = clients[3:]
        # Bulk messages ("b…") are acked as they arrive; pending ones ("p…") never.
        flat_inbox = Recipient(flat_client, flat, ledger, lambda mid: mid.startswith("b"))
        empty_inbox = Recipient(empty_client, empty, ledger, lambda mid: False)
        # The loaders keep at most a window of messages not yet acked: the server
        # stores faster than it delivers, and unbounded, its queues would grow
        # until it cut the recipient off. The main sender sends everything else.
        loaders = [
            Sender(c, e, flat, ledger, plan.flat_window, CONTENT, settle="acked")
            for c, e in zip(loader_clients, loader_emails, strict=True)
        ]
        main = Sender(main_client, main_email, flat, ledger, plan.flat_window, CONTENT)
        try:
            await identify_all(
                [flat_client, empty_client],
                [flat, empty],
                [flat_inbox.handle, empty_inbox.handle],
                IDENTIFY_TIMEOUT,
            )
            await identify_all(
                [main_client, *loader_clients],
                [main_email, *loader_emails],
                [main.handle, *(s.handle for s in loaders)],
                IDENTIFY_TIMEOUT,
            )
            flat_inbox.follow(url)
            empty_inbox.follow(url)

            bulk = max(0, plan.flat_preload - pending)
            started = now()
            deadline = started + budget
            serial = itertools.count()

            async def pump(sender: Sender) -> None:
                while (i := next(serial)) < bulk:
                    if not await sender.send(f"b{i}", deadline):
                        return

            await asyncio.gather(*(pump(s) for s in loaders))
            # Everything sent must be in the inbox and acked before measuring.
            settled = await ledger.wait(ledger.all_acked, now() + plan.drain)
            result.preload_s = now() - started
            bulk_stored = ledger.stored
            result.preload_acked = ledger.acked
            result.timed_out["preload"] = not settled
            if not settled:
                result.notes.append(
                    f"preload: only {ledger.acked} of {ledger.expected} acked within the bound"
                )

            for prefix, to in (("pf", flat), ("pe", empty)):
                for i in range(pending):
                    await main.send(f"{prefix}{i}", now() + plan.flat_budget, to)
            arrived = await ledger.wait(ledger.all_counted, now() + plan.drain)
            result.timed_out["pending"] = not arrived
            if not arrived:
                result.notes.append(
                    f"pending: {ledger.counted} of {ledger.expected} reached their "
                    "recipient within the bound"
                )
            result.preloaded = bulk_stored + pending
            result.preload_short = result.preloaded < plan.flat_preload
            reconnects = flat_inbox.reconnects + empty_inbox.reconnects
            if reconnects:
                result.notes.append(
                    f"recipient reconnected {len(reconnects)} times ({reconnects[0]})"
                )
        except BaseException:
            await main_client.close()
            raise
        finally:
            await flat_inbox.close()
            await empty_inbox.close()
            await close_all(loader_clients)

        try:
            # Both recipients are offline from here on; the main sender stays.
            totals = {"flat": 0.0, "empty": 0.0}
            for _ in range(plan.flat_identifies):
                for name, email in (("flat", flat), ("empty", empty)):
                    totals[name] += await identify_with_backlog(
                        url, email, pending, plan.flat_budget
                    )
            for name in totals:
                result.rates[name]["identify"] = plan.flat_identifies / totals[name]

            # Alternating rounds, and the median of each: one full garbage
            # collection of a 100,000-message heap can halve a single run.
            stored_rates: dict[str, list[float]] = {"flat": [], "empty": []}
            for round_ in range(rounds):
                for name, email in (("flat", flat), ("empty", empty)):
                    rate, timed_out = await _stored_rate(
                        main, email, f"a{name[0]}{round_}x", sends, plan.flat_budget
                    )
                    if rate is not None:
                        stored_rates[name].append(rate)
                    result.timed_out[f"stored_{name}"] = (
                        result.timed_out.get(f"stored_{name}", False) or timed_out
                    )
            for name, rates in stored_rates.items():
                result.rates[name]["stored"] = median(rates)

            for name, email in (("flat", flat), ("empty", empty)):
                stored = sum(
                    1
                    for (who, mid), r in ledger.records.items()
                    if who == main.email and mid.startswith(f"a{name[0]}") and r.stored
                )
                rate, count, timed_out = await _ack_rate(
                    url, email, pending + stored, ledger, main.email, plan.flat_budget
                )
                result.rates[name]["ack"] = rate
                result.rates[name]["ack_count"] = count
                result.timed_out[f"ack_{name}"] = timed_out
        finally:
            await main.client.close()
    return result


def _inbox_note(m: Measure) -> str:
    if not m.preload_short:
        return f"inbox of {m.preloaded:,} (preload {m.preload_s:.0f} s)"
    return (
        f"inbox of {m.preloaded:,} only, not {m.preload_target:,}: the preload stopped at "
        f"its {m.preload_budget:g} s bound"
    )


async def run(ctx: Context) -> FigureResult:
    """Measure the flat-inbox ratios on the embedded store and on nx-27017."""
    plan = ctx.plan
    result = FigureResult(
        "flat",
        "Flat inbox",
        params={
            "preload_target": plan.flat_preload,
            "pending": plan.flat_pending,
            "preload_senders": plan.flat_preload_senders,
            "preload_budget_s": plan.flat_preload_budget,
            "preload_budget_nx_s": plan.flat_preload_budget_nx,
            "sends": plan.flat_sends,
            "sends_nx": plan.flat_sends_nx,
            "rounds": plan.flat_rounds,
            "identifies": plan.flat_identifies,
            "window": plan.flat_window,
        },
    )
    try:
        embedded = await measure(ctx, None)
    except (ServerFailed, LoadError, TimeoutError) as exc:
        result.error = str(exc)
        for label in OPERATIONS.values():
            result.rows.append(
                error_row(
                    f"Flat inbox {label}, embedded",
                    "ratio",
                    "empty inbox",
                    str(exc).splitlines()[0],
                )
            )
    else:
        result.series["embedded"] = embedded.summary()
        for op, label in OPERATIONS.items():
            timed_out = embedded.incomplete(op)
            result.rows.append(
                Row(
                    f"Flat inbox {label}, embedded",
                    "/s",
                    embedded.rates["flat"].get(op),
                    embedded.rates["empty"].get(op),
                    "same on an empty inbox",
                    target=TARGET,
                    status="timeout" if timed_out else "ok",
                    note=join(_inbox_note(embedded), *embedded.notes),
                )
            )

    try:
        async with NxServer(ctx.workdir) as nx:
            ours = await measure(ctx, nx.uri)
            bare = await run_bare(
                "flat",
                nx.uri,
                "bareflat",
                600,
                preloaded=max(0, ours.preloaded - plan.flat_pending),
                pending=plan.flat_pending,
                count=plan.flat_sends_nx,
                finds=plan.flat_identifies,
            )
    except (ServerFailed, LoadError, BareFailed, TimeoutError) as exc:
        result.error = join(result.error or "", str(exc))
        for label in OPERATIONS.values():
            result.rows.append(
                error_row(
                    f"Flat inbox {label}, nx-27017",
                    "ratio",
                    "nx-27017's own ratio",
                    str(exc).splitlines()[0],
                )
            )
        return result
    result.series["nx-27017"] = ours.summary()
    result.series["nx-27017-bare"] = bare
    bare_key = {"stored": "stored", "identify": "identify_backlog", "ack": "ack"}
    for op, label in OPERATIONS.items():
        mine = ours.ratio(op)
        theirs = bare["ratios"].get(bare_key[op])
        timed_out = ours.incomplete(op)
        flat_rate, empty_rate = ours.rates["flat"].get(op), ours.rates["empty"].get(op)
        result.rows.append(
            Row(
                f"Flat inbox {label}, nx-27017 (÷ nx's own ratio)",
                "ratio",
                mine,
                theirs,
                "nx-27017's bare ratio, same queries",
                target=TARGET,
                status="timeout" if timed_out else "ok",
                note=join(
                    f"ours {_num(flat_rate)}/s flat vs {_num(empty_rate)}/s empty",
                    f"bare nx {_num(bare['rates']['flat'][bare_key[op]])}/s vs "
                    f"{_num(bare['rates']['empty'][bare_key[op]])}/s",
                    _inbox_note(ours),
                    *ours.notes,
                ),
            )
        )
    return result


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"
