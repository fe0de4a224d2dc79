"""The load generator: WebSocket clients that speak Tidings' protocol, and the runs they make.

One client class serves Tidings and the echo baseline alike. Every wait has a
deadline: a run that hits one stops and reports what it reached (``timed_out``),
it never hangs.

Time is ``loop.time()`` (monotonic) of this one process, so a latency is the
difference of two readings of the same clock: the time a frame was meant to be
sent, and the time its counterpart was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from bench.proc import CpuMeter

Frame = dict[str, Any]
Handler = Callable[[Frame], None]

CONNECT_TIMEOUT = 15.0
IDENTIFY_TIMEOUT = 30.0
# Codes after which the protocol says: send the same id again.
RESEND_CODES = frozenset({"unavailable", "internal"})
MAX_ATTEMPTS = 5
RESEND_DELAY = 0.1
STORED_OR_LATER = frozenset({"stored", "sent", "delivered", "read"})
ACKED = frozenset({"delivered", "read"})
# Connections opened at once while setting up a run.
OPEN_CONCURRENCY = 32
_runs = itertools.count(1)


class LoadError(RuntimeError):
    """A run could not even start (a connection or an identification failed)."""


def run_tag(label: str) -> str:
    """A tag unique to this process and run, so that every run has fresh users."""
    return f"{label}{os.getpid() % 10000}r{next(_runs)}"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def now() -> float:
    return asyncio.get_running_loop().time()


class Client:
    """One WebSocket connection: a reader that hands every frame to ``handler``,
    and a writer fed by a queue, so that answering a frame never blocks reading.
    """

    def __init__(self, ws: ClientConnection, label: str) -> None:
        self.ws = ws
        self.label = label
        self.handler: Handler = _ignore
        self.closed = asyncio.Event()
        self.close_info: str | None = None
        self._outgoing: asyncio.Queue[str] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(), name=f"read:{label}")
        self._writer = asyncio.create_task(self._write(), name=f"write:{label}")

    @classmethod
    async def open(cls, url: str, label: str, budget: float = CONNECT_TIMEOUT) -> Client:
        """Connect without compression, with no frame limit worth the name and no
        client pings: a server busy for a while must not be cut by the client.
        """
        try:
            ws = await connect(
                url,
                compression=None,
                max_size=2**26,
                max_queue=None,
                ping_interval=None,
                open_timeout=budget,
                close_timeout=2,
                proxy=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise LoadError(f"{label}: could not connect: {exc!r}") from exc
        return cls(ws, label)

    def send(self, frame: Frame) -> None:
        """Queue a JSON frame."""
        self._outgoing.put_nowait(orjson.dumps(frame).decode())

    def send_text(self, text: str) -> None:
        """Queue a text frame as it is."""
        self._outgoing.put_nowait(text)

    async def identify(self, email: str, then: Handler, budget: float = IDENTIFY_TIMEOUT) -> Frame:
        """Send ``#email`` and wait for the reply; every later frame goes to ``then``.

        The switch happens in the reader as the reply arrives, so the backlog that
        follows it at once reaches ``then`` too.
        """
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Frame] = loop.create_future()

        def waiting(frame: Frame) -> None:
            if frame.get("type") == "#email":
                self.handler = then
                if not reply.done():
                    reply.set_result(frame)
            elif frame.get("type") == "error" and not reply.done():
                reply.set_exception(LoadError(f"{self.label}: identify refused: {frame}"))

        self.handler = waiting
        self.send({"type": "#email", "email": email})
        closed = asyncio.ensure_future(self.closed.wait())
        waits: set[asyncio.Future[Any]] = {reply, closed}
        try:
            done, _ = await asyncio.wait(waits, timeout=budget, return_when="FIRST_COMPLETED")
        finally:
            closed.cancel()
        if reply in done:
            return reply.result()
        reply.cancel()
        if closed in done:
            raise LoadError(f"{self.label}: closed while identifying: {self.close_info}")
        raise LoadError(f"{self.label}: no #email reply within {budget:g} s")

    async def close(self) -> None:
        """Close politely, bounded by the connection's close timeout."""
        self._writer.cancel()
        with contextlib.suppress(OSError, WebSocketException, TimeoutError):
            await self.ws.close()
        for task in (self._reader, self._writer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.handler(orjson.loads(raw))
        except ConnectionClosed:
            pass
        except (OSError, orjson.JSONDecodeError) as exc:
            self.close_info = repr(exc)
        finally:
            if self.close_info is None:
                self.close_info = _close_text(self.ws)
            self.closed.set()

    async def _write(self) -> None:
        try:
            while True:
                await self.ws.send(await self._outgoing.get())
        except (ConnectionClosed, OSError):
            return


def _ignore(frame: Frame) -> None:
    """The handler of a client nobody listens to."""


def _close_text(ws: ClientConnection) -> str:
    rcvd = ws.protocol.close_rcvd
    if rcvd is not None:
        return f"closed by server {rcvd.code} {rcvd.reason!r}"
    sent = ws.protocol.close_sent
    if sent is not None:
        return f"closed by client {sent.code}"
    return "connection lost"


async def open_clients(url: str, labels: Sequence[str], budget: float) -> list[Client]:
    """Open one connection per label, a few at a time; all or nothing."""
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(label: str) -> Client:
        async with gate:
            return await Client.open(url, label, budget)

    results = await asyncio.gather(*(one(label) for label in labels), return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(clients)
        raise LoadError(f"{len(errors)} of {len(labels)} connections failed: {errors[0]}")
    return clients


async def close_all(clients: Iterable[Client]) -> None:
    """Close many clients at once."""
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------- messages


@dataclass(slots=True)
class Record:
    """One message of a run, by the load generator's clock."""

    due: float
    stored: float | None = None
    received: float | None = None
    acked: float | None = None
    failed: str | None = None
    attempts: int = 1

    @property
    def counted(self) -> float | None:
        """When the message counted as delivered: the recipient has it and its
        sender saw ``stored`` (or a later state)."""
        if self.stored is None or self.received is None:
            return None
        return max(self.stored, self.received)


class Ledger:
    """Every message of one run, keyed by (sender, id)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], Record] = {}
        self.expected = 0
        self.counted = 0
        self.stored = 0
        self.acked = 0
        self.failed = 0
        self.resent = 0
        self.duplicates = 0
        self.changed = asyncio.Event()

    def sent(self, key: tuple[str, str], due: float) -> None:
        self.records[key] = Record(due)
        self.expected += 1

    def on_stored(self, key: tuple[str, str], at: float) -> None:
        record = self.records.get(key)
        if record is None or record.stored is not None:
            return
        record.stored = at
        self.stored += 1
        if record.received is not None:
            self.counted += 1
        self.changed.set()

    def on_received(self, key: tuple[str, str], at: float) -> bool:
        """Record the recipient's copy; True the first time (False: unknown or again)."""
        record = self.records.get(key)
        if record is None:
            return False
        if record.received is not None:
            self.duplicates += 1
            return False
        record.received = at
        if record.stored is not None:
            self.counted += 1
        self.changed.set()
        return True

    def on_acked(self, key: tuple[str, str], at: float) -> None:
        record = self.records.get(key)
        if record is None or record.acked is not None:
            return
        record.acked = at
        self.acked += 1
        self.changed.set()

    def on_failed(self, key: tuple[str, str], reason: str) -> None:
        record = self.records.get(key)
        if record is None or record.failed is not None or record.stored is not None:
            return
        record.failed = reason
        self.failed += 1
        self.changed.set()

    async def wait(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()`` holds or the loop clock passes ``deadline``."""
        while not done():
            remaining = deadline - now()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    def all_counted(self) -> bool:
        return self.counted + self.failed >= self.expected

    def all_stored(self) -> bool:
        return self.stored + self.failed >= self.expected

    def all_acked(self) -> bool:
        return self.acked + self.failed >= self.expected

    def latencies(self) -> list[float]:
        """Seconds from when each delivered message was due to be sent to its receipt."""
        return [r.received - r.due for r in self.records.values() if r.received is not None]

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for record in self.records.values():
            if record.failed is not None:
                out[record.failed] = out.get(record.failed, 0) + 1
        return out


class Sender:
    """A sending client: sends pipelined, follows each message's state frames.

    At most ``window`` messages are in flight; 0 means no bound. In flight
    means sent and not yet ``stored`` (``settle="stored"``, the default), or
    not yet ``delivered`` (``settle="acked"``: end-to-end flow control, for
    loading a server without queueing more work in it than the window).
    ``failed`` with code ``internal``, or an error with code ``unavailable``,
    sends the same id again, ``MAX_ATTEMPTS`` times at most.
    """

    def __init__(
        self,
        client: Client,
        email: str,
        to: str,
        ledger: Ledger,
        window: int,
        content: str,
        settle: str = "stored",
    ) -> None:
        self.client = client
        self.email = email
        self.to = to
        self.ledger = ledger
        self.content = content
        self.window = window
        self._settled_by = STORED_OR_LATER if settle == "stored" else ACKED
        self._room = asyncio.Semaphore(window) if window > 0 else None
        self._in_flight: set[str] = set()
        self._frames: dict[str, str] = {}
        self._ids = itertools.count()
        self.errors: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_id(self, prefix: str = "m") -> str:
        return f"{prefix}{next(self._ids)}"

    async def send(self, mid: str, deadline: float, to: str | None = None) -> bool:
        """Send one message once there is room in the window; False past ``deadline``."""
        if self._room is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - now())):
                    await self._room.acquire()
            except TimeoutError:
                return False
        self.send_now(mid, now(), to)
        return True

    def send_now(self, mid: str, due: float, to: str | None = None) -> None:
        """Send at once, window or not (the open-loop runs schedule it themselves)."""
        text = orjson.dumps(
            {"type": "message", "to": to or self.to, "content": self.content, "id": mid}
        ).decode()
        self._frames[mid] = text
        self._in_flight.add(mid)
        self.ledger.sent((self.email, mid), due)
        self.client.send_text(text)

    def handle(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "state":
            self._on_state(frame)
        elif kind == "error":
            code = str(frame.get("code"))
            self.errors[code] = self.errors.get(code, 0) + 1
            ref = frame.get("ref")
            if isinstance(ref, str) and ref in self._in_flight:
                self._retry_or_fail(ref, code)

    def _on_state(self, frame: Frame) -> None:
        mid = str(frame.get("id"))
        state = frame.get("state")
        key = (self.email, mid)
        at = now()
        if state in STORED_OR_LATER:
            self.ledger.on_stored(key, at)
            if state in ACKED:
                self.ledger.on_acked(key, at)
            if state in self._settled_by:
                self._settle(mid)
        elif state == "failed" and mid in self._in_flight:
            self._retry_or_fail(mid, str(frame.get("code")))

    def _retry_or_fail(self, mid: str, code: str) -> None:
        record = self.ledger.records.get((self.email, mid))
        if code in RESEND_CODES and record is not None and record.attempts < MAX_ATTEMPTS:
            record.attempts += 1
            self.ledger.resent += 1
            asyncio.get_running_loop().call_later(RESEND_DELAY, self._resend, mid)
            return
        self.ledger.on_failed((self.email, mid), code)
        self._settle(mid)

    def _resend(self, mid: str) -> None:
        if mid in self._in_flight and not self.client.closed.is_set():
            self.client.send_text(self._frames[mid])

    def _settle(self, mid: str) -> None:
        if mid in self._in_flight:
            self._in_flight.discard(mid)
            self._frames.pop(mid, None)
            if self._room is not None:
                self._room.release()


class Recipient:
    """A receiving client: records each message and acks it (unless ``ack`` says no).

    After ``follow(url)``, a connection that the server closes (a slow
    consumer, say) is opened again and identified again, as a real client
    would; the backlog then brings back what was not acknowledged. That
    happens ``MAX_RECONNECTS`` times at most, and is counted.
    """

    MAX_RECONNECTS = 20

    def __init__(
        self,
        client: Client,
        email: str,
        ledger: Ledger,
        ack: Callable[[str], bool] | None = None,
    ) -> None:
        self.client = client
        self.email = email
        self.ledger = ledger
        self._ack = ack
        self.ignored = 0
        self.reconnects: list[str] = []
        self._follower: asyncio.Task[None] | None = None

    def handle(self, frame: Frame) -> None:
        if frame.get("type") != "message":
            return
        mid = str(frame.get("id"))
        sender = str(frame.get("from"))
        if not self.ledger.on_received((sender, mid), now()):
            # Not of this run, or again (redelivered): acked all the same.
            self.ignored += 1
        if self._ack is None or self._ack(mid):
            self.client.send({"type": "ack", "id": mid, "from": sender})

    def follow(self, url: str) -> None:
        """Reconnect whenever the server closes this recipient's connection."""
        self._follower = asyncio.create_task(self._follow(url), name=f"follow:{self.email}")

    async def _follow(self, url: str) -> None:
        while len(self.reconnects) < self.MAX_RECONNECTS:
            await self.client.closed.wait()
            if (self.client.close_info or "").startswith("closed by client"):
                return
            self.reconnects.append(self.client.close_info or "closed")
            await self.client.close()
            try:
                client = await Client.open(url, self.email)
                self.client = client
                await client.identify(self.email, self.handle)
            except LoadError:
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        """Stop following, then close."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.client.close()


@dataclass
class Pairs:
    """Senders, each with a recipient of its own, connected and identified."""

    ledger: Ledger
    senders: list[Sender]
    recipients: list[Recipient]

    @property
    def clients(self) -> list[Client]:
        return [s.client for s in self.senders] + [r.client for r in self.recipients]

    def closes(self) -> list[str]:
        """Why, for each client that the server closed or that lost its connection."""
        closed = [
            f"{c.label}: {c.close_info}"
            for c in self.clients
            if c.closed.is_set() and not (c.close_info or "").startswith("closed by client")
        ]
        for r in self.recipients:
            closed += [f"{r.email} (reconnected): {why}" for why in r.reconnects]
        return closed

    def reconnects(self) -> int:
        return sum(len(r.reconnects) for r in self.recipients)

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.recipients), return_exceptions=True)
        await close_all(s.client for s in self.senders)


async def identify_all(
    clients: Sequence[Client], emails: Sequence[str], handlers: Sequence[Handler], budget: float
) -> None:
    """Identify each client as its e-mail, a few at a time; raise on the first failure."""
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(client: Client, email: str, handler: Handler) -> None:
        async with gate:
            await client.identify(email, handler, budget)

    await asyncio.gather(*(one(c, e, h) for c, e, h in zip(clients, emails, handlers, strict=True)))


async def open_pairs(
    url: str,
    count: int,
    tag: str,
    window: int,
    content: str = "hello from the load generator",
    ack: bool = True,
    budget: float = IDENTIFY_TIMEOUT,
) -> Pairs:
    """``count`` sender→recipient pairs with fresh e-mails, all identified.

    Recipients identify first: a message to an e-mail that never identified fails.
    """
    ledger = Ledger()
    s_emails = [f"{tag}-s{i}@bench.test" for i in range(count)]
    r_emails = [f"{tag}-r{i}@bench.test" for i in range(count)]
    clients = await open_clients(url, [*s_emails, *r_emails], CONNECT_TIMEOUT)
    s_clients, r_clients = clients[:count], clients[count:]
    recipients = [
        Recipient(c, e, ledger, None if ack else _never)
        for c, e in zip(r_clients, r_emails, strict=True)
    ]
    senders = [
        Sender(c, e, to, ledger, window, content)
        for c, e, to in zip(s_clients, s_emails, r_emails, strict=True)
    ]
    try:
        await identify_all(r_clients, r_emails, [r.handle for r in recipients], budget)
        await identify_all(s_clients, s_emails, [s.handle for s in senders], budget)
    except BaseException:
        await close_all(clients)
        raise
    for recipient in recipients:
        recipient.follow(url)
    return Pairs(ledger, senders, recipients)


def _never(mid: str) -> bool:
    return False


@dataclass
class RunResult:
    """What one run reached, whether or not it finished."""

    expected: int
    sent: int
    counted: int
    stored: int
    acked: int
    failed: int
    elapsed: float
    timed_out: bool
    latencies: list[float] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    resent: int = 0
    loadgen_cpu: float | None = None
    server_cpu: float | None = None
    lag_max: float = 0.0
    measure: str = "counted"
    reconnects: int = 0

    @property
    def rate(self) -> float | None:
        """Counted (delivered) messages per second of the run, or stored ones."""
        done = self.counted if self.measure == "counted" else self.stored
        return done / self.elapsed if self.elapsed > 0 else None

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers, without the raw latencies."""
        lat = self.latencies
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        return {
            "expected": self.expected,
            "sent": self.sent,
            "counted": self.counted,
            "stored": self.stored,
            "acked": self.acked,
            "failed": self.failed,
            "resent": self.resent,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": None if self.rate is None else round(self.rate, 2),
            "timed_out": self.timed_out,
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "closed_by_server": self.closes[:5],
            "recipient_reconnects": self.reconnects,
            "errors": self.errors,
            "failures": self.failures,
            "loadgen_cpu": self.loadgen_cpu,
            "generator_lag_max_ms": round(self.lag_max * 1000, 2),
        }


def _result(
    pairs: Pairs, started: float, ended: float, timed_out: bool, meter: CpuMeter
) -> RunResult:
    ledger = pairs.ledger
    errors: dict[str, int] = {}
    for sender in pairs.senders:
        for code, n in sender.errors.items():
            errors[code] = errors.get(code, 0) + n
    return RunResult(
        expected=ledger.expected,
        sent=ledger.expected,
        counted=ledger.counted,
        stored=ledger.stored,
        acked=ledger.acked,
        failed=ledger.failed,
        elapsed=ended - started,
        timed_out=timed_out,
        latencies=ledger.latencies(),
        closes=pairs.closes(),
        errors=errors,
        failures=ledger.failures(),
        resent=ledger.resent,
        loadgen_cpu=meter.stop(),
        reconnects=pairs.reconnects(),
    )


async def drive_throughput(
    pairs: Pairs, per_sender: int, budget: float, measure: str = "counted"
) -> RunResult:
    """Every sender sends ``per_sender`` messages through its window; recipients ack.

    With ``measure="counted"`` the clock runs from the first send to the moment
    the last message counted (its recipient had it and its sender saw
    ``stored``); with ``measure="stored"``, to the last ``stored``, recipients or
    not. Bounded by ``budget`` seconds: past it, what was reached is reported.
    """
    meter = CpuMeter(os.getpid())
    meter.start()
    started = now()
    deadline = started + budget

    async def pump(sender: Sender) -> None:
        for _ in range(per_sender):
            if not await sender.send(sender.next_id(), deadline):
                return

    pumps = [asyncio.create_task(pump(s)) for s in pairs.senders]
    total = per_sender * len(pairs.senders)
    ledger = pairs.ledger

    def reached() -> int:
        return ledger.counted if measure == "counted" else ledger.stored

    finished = await ledger.wait(lambda: reached() + ledger.failed >= total, deadline)
    ended = _last(ledger, measure) if finished else now()
    for task in pumps:
        task.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    result = _result(pairs, started, max(ended, started + 1e-6), not finished, meter)
    result.expected = total
    result.measure = measure
    return result


def _last(ledger: Ledger, measure: str) -> float:
    """When the last message counted (or was stored)."""
    if measure == "counted":
        times = [t for r in ledger.records.values() if (t := r.counted) is not None]
    else:
        times = [r.stored for r in ledger.records.values() if r.stored is not None]
    return max(times) if times else now()


async def drive_offered(
    pairs: Pairs, rate: float, duration: float, drain: float, in_flight_cap: int = 2000
) -> RunResult:
    """Open loop: ``rate`` messages a second in all, round-robin over the senders, for
    ``duration`` seconds, whatever the server answers; then wait up to ``drain``
    seconds for the rest to arrive. Latency is measured from when each message
    was due, so a generator that falls behind does not hide the wait.

    A sender with ``in_flight_cap`` messages not yet stored waits: that bounds the
    generator's memory when the server falls far behind (counted in ``held``).
    """
    meter = CpuMeter(os.getpid())
    meter.start()
    total = max(1, int(rate * duration))
    start = now() + 0.05
    lag = 0.0
    held = 0
    senders = pairs.senders
    for i in range(total):
        due = start + i / rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        sender = senders[i % len(senders)]
        while sender.in_flight >= in_flight_cap and now() < start + duration + drain:
            held += 1
            await asyncio.sleep(0.01)
        lag = max(lag, now() - due)
        sender.send_now(sender.next_id(), due)
    ledger = pairs.ledger
    finished = await ledger.wait(
        lambda: ledger.counted + ledger.failed >= total, start + duration + drain
    )
    result = _result(pairs, start, now(), not finished, meter)
    result.expected = total
    result.lag_max = lag
    if held:
        result.errors["generator_held_back"] = held
    return result


async def wait_acked(pairs: Pairs, budget: float) -> bool:
    """Wait (bounded) until every sender saw ``delivered`` for every stored message,
    so that the next run does not share the server with this one's acks."""
    ledger = pairs.ledger
    return await ledger.wait(
        lambda: ledger.acked + ledger.failed >= ledger.expected, now() + budget
    )


# ---------------------------------------------------------------- echo


@dataclass
class EchoResult:
    """Round trips of the echo baseline."""

    expected: int
    done: int
    elapsed: float
    timed_out: bool
    loadgen_cpu: float | None

    @property
    def rate(self) -> float | None:
        return self.done / self.elapsed if self.elapsed > 0 else None

    def summary(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "round_trips": self.done,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": None if self.rate is None else round(self.rate, 2),
            "timed_out": self.timed_out,
            "loadgen_cpu": self.loadgen_cpu,
        }


async def drive_echo(
    url: str, connections: int, per_conn: int, window: int, budget: float
) -> EchoResult:
    """Each connection round-trips ``per_conn`` frames shaped like a ``message`` frame,
    pipelined through the same window as the Tidings senders; each echo is parsed
    as JSON, as the senders parse their state frames."""
    clients = await open_clients(url, [f"echo{i}" for i in range(connections)], CONNECT_TIMEOUT)
    meter = CpuMeter(os.getpid())
    done = 0
    changed = asyncio.Event()
    rooms = [asyncio.Semaphore(window) for _ in clients]

    def handler_for(room: asyncio.Semaphore) -> Handler:
        def handle(frame: Frame) -> None:
            nonlocal done
            done += 1
            room.release()
            changed.set()

        return handle

    for client, room in zip(clients, rooms, strict=True):
        client.handler = handler_for(room)
    meter.start()
    started = now()
    deadline = started + budget

    async def pump(client: Client, room: asyncio.Semaphore) -> None:
        for i in range(per_conn):
            try:
                async with asyncio.timeout(max(0.0, deadline - now())):
                    await room.acquire()
            except TimeoutError:
                return
            client.send(
                {
                    "type": "message",
                    "to": "echo@bench.test",
                    "content": "hello from the load generator",
                    "id": f"m{i}",
                }
            )

    pumps = [asyncio.create_task(pump(c, r)) for c, r in zip(clients, rooms, strict=True)]
    total = connections * per_conn
    while done < total and now() < deadline:
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(0.5, max(0.0, deadline - now())))
    ended = now()
    for task in pumps:
        task.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    cpu = meter.stop()
    await close_all(clients)
    return EchoResult(total, done, ended - started, done < total, cpu)


# ---------------------------------------------------------------- one user at a time


async def identify_with_backlog(url: str, email: str, backlog: int, budget: float) -> float:
    """Seconds from connecting to holding ``backlog`` backlog messages, for one
    connection that identifies as ``email`` and acks nothing; closed after."""
    started = now()
    client = await Client.open(url, f"identify:{email}")
    got = 0
    full = asyncio.Event()

    def count(frame: Frame) -> None:
        nonlocal got
        if frame.get("type") == "message":
            got += 1
            if got >= backlog:
                full.set()

    try:
        await client.identify(email, count, budget)
        if backlog > 0:
            async with asyncio.timeout(max(0.0, started + budget - now())):
                await full.wait()
        return now() - started
    except TimeoutError as exc:
        raise LoadError(
            f"{email}: {got} of {backlog} backlog messages within {budget:g} s"
        ) from exc
    finally:
        await client.close()


async def open_identified(
    url: str, count: int, tag: str, budget: float
) -> tuple[list[Client], bool]:
    """Up to ``count`` idle connections, each identified as a fresh e-mail, opened a
    few at a time until ``budget`` seconds pass; the clients and whether it fell short."""
    deadline = now() + budget
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    clients: list[Client] = []

    async def one(i: int) -> None:
        async with gate:
            if now() > deadline:
                return
            email = f"{tag}-idle{i}@bench.test"
            try:
                client = await Client.open(url, email, max(0.1, deadline - now()))
            except LoadError:
                return
            try:
                await client.identify(email, _ignore, max(0.1, deadline - now()))
            except LoadError:
                await client.close()
                return
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(count)))
    return clients, len(clients) < count
