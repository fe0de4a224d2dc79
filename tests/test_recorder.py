"""The recorder: transitions coalesced per message and written in batches, off the callers' paths.

The store is the memory engine's behind a ``FlakyStore`` whose ``record`` also
keeps each batch it was handed (``Ledger``), so that what the recorder wrote,
and in how many calls, can be read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import pytest

from tests.fakes import ALICE, BOB, CAROL, TIMEOUT, FlakyStore, spin, until
from tidings.engine import Store
from tidings.engine.memory import memory_engine
from tidings.errors import StoreUnavailable
from tidings.models import Draft, Message, Transition
from tidings.recorder import Recorder
from tidings.states import MessageState

S = MessageState


class Ledger(FlakyStore):
    """A ``FlakyStore`` that keeps every batch ``record`` was called with, in order.

    It wraps a fresh memory store unless given one.
    """

    def __init__(self, inner: Store | None = None) -> None:
        super().__init__(inner or memory_engine().store)
        self.batches: list[list[Transition]] = []

    async def record(self, transitions: Sequence[Transition]) -> None:
        self.batches.append(list(transitions))
        await super().record(transitions)


class Gate:
    """A ``before`` hook that holds the first call it sees until ``open`` is called."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self._open = asyncio.Event()
        self._calls = 0

    async def __call__(self) -> None:
        self._calls += 1
        if self._calls == 1:
            self.held.set()
            await self._open.wait()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def recorder(ledger: Ledger) -> AsyncIterator[Recorder]:
    """A recorder on the ledger, its ``run`` task running for the test."""
    recorder = Recorder(ledger)
    task = asyncio.create_task(recorder.run())
    yield recorder
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def stored(store: FlakyStore, *ids: str, sender: str = ALICE) -> list[Message]:
    """Messages from ``sender`` to Bob, stored through the inner store."""
    outcomes = await store.inner.send(sender, "c0", [Draft(mid, BOB, "x") for mid in ids])
    messages = [outcome.stored for outcome in outcomes]
    assert all(m is not None for m in messages)
    return [m for m in messages if m is not None]


async def states(store: FlakyStore, *ids: str) -> dict[str, MessageState]:
    return {m.id: m.state for m in await store.inner.find_inbox(BOB, list(ids))}


async def test_the_first_transition_into_an_idle_recorder_is_written_at_once(
    ledger: Ledger, recorder: Recorder
) -> None:
    (m1,) = await stored(ledger, "m1")
    await asyncio.wait_for(recorder.write([Transition.of(m1, S.SENT)]), TIMEOUT)
    assert ledger.batches == [[Transition.of(m1, S.SENT)]]
    assert await states(ledger, "m1") == {"m1": S.SENT}


async def test_transitions_that_arrive_during_a_write_are_coalesced_into_one_batch(
    ledger: Ledger, recorder: Recorder
) -> None:
    m1, m2, m3 = await stored(ledger, "m1", "m2", "m3")
    (carols,) = await stored(ledger, "m2", sender=CAROL)  # same id, another sender
    gate = Gate()
    ledger.before["record"] = gate
    recorder.record(Transition.of(m1, S.SENT))
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    # While the first write is in flight: the furthest state of each message wins,
    # whatever order the transitions came in; messages are told apart by sender too.
    recorder.record(Transition.of(m2, S.DELIVERED))
    recorder.record(Transition.of(m2, S.READ))
    recorder.record(Transition.of(m2, S.SENT))
    recorder.record(Transition.of(m3, S.READ))
    recorder.record(Transition.of(m3, S.DELIVERED))
    recorder.record(Transition.of(carols, S.DELIVERED))
    recorder.record(Transition.of(m1, S.READ))
    await spin()
    assert ledger.calls.count("record") == 1  # nothing else is written meanwhile
    gate.open()
    await until(lambda: len(ledger.batches) == 2)
    await spin()
    assert ledger.calls.count("record") == 2
    assert ledger.batches[0] == [Transition.of(m1, S.SENT)]
    assert sorted(ledger.batches[1], key=lambda t: (t.id, t.sender)) == [
        Transition.of(m1, S.READ),
        Transition.of(m2, S.READ),
        Transition.of(carols, S.DELIVERED),
        Transition.of(m3, S.READ),
    ]
    found = {(m.sender, m.id): m.state for m in await ledger.inner.find_inbox(BOB, ["m2"])}
    assert found == {(ALICE, "m2"): S.READ, (CAROL, "m2"): S.DELIVERED}


async def test_a_batch_holds_at_most_max_batch_messages(ledger: Ledger) -> None:
    messages = await stored(ledger, *(f"m{n}" for n in range(6)))
    recorder = Recorder(ledger, max_batch=2)
    task = asyncio.create_task(recorder.run())
    try:
        gate = Gate()
        ledger.before["record"] = gate
        recorder.record(Transition.of(messages[0], S.SENT))
        await asyncio.wait_for(gate.held.wait(), TIMEOUT)
        for m in messages[1:]:
            recorder.record(Transition.of(m, S.SENT))
        gate.open()
        await until(lambda: sum(len(batch) for batch in ledger.batches) == 6)
        assert [len(batch) for batch in ledger.batches] == [1, 2, 2, 1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_write_returns_once_the_batch_carrying_it_is_written(
    ledger: Ledger, recorder: Recorder
) -> None:
    m1, m2 = await stored(ledger, "m1", "m2")
    gate = Gate()
    ledger.before["record"] = gate
    first = asyncio.create_task(recorder.write([Transition.of(m1, S.SENT)]))
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    second = asyncio.create_task(
        recorder.write([Transition.of(m2, S.SENT), Transition.of(m1, S.DELIVERED)])
    )
    # Coalesced into a further state that waits already: settled when that is written.
    third = asyncio.create_task(recorder.write([Transition.of(m2, S.READ)]))
    late = asyncio.create_task(recorder.write([Transition.of(m2, S.DELIVERED)]))
    await spin()
    assert not any(task.done() for task in (first, second, third, late))
    gate.open()
    await asyncio.wait_for(first, TIMEOUT)
    assert (await states(ledger, "m1"))["m1"] in (S.SENT, S.DELIVERED)
    await asyncio.wait_for(asyncio.gather(second, third, late), TIMEOUT)
    assert await states(ledger, "m1", "m2") == {"m1": S.DELIVERED, "m2": S.READ}
    assert len(ledger.batches) == 2


async def test_a_failed_batch_fails_its_writes_is_logged_and_the_recorder_goes_on(
    ledger: Ledger, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    m1, m2 = await stored(ledger, "m1", "m2")
    ledger.fail.add("record")
    with pytest.raises(StoreUnavailable, match="database error"):
        await asyncio.wait_for(recorder.write([Transition.of(m1, S.DELIVERED)]), TIMEOUT)
    failures = [r for r in caplog.records if r.getMessage() == "record_failed"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert failures[0].__dict__["count"] == 1
    ledger.fail.clear()
    await asyncio.wait_for(recorder.write([Transition.of(m2, S.DELIVERED)]), TIMEOUT)
    # The failed transition is not retried: its caller was told, and decides.
    assert await states(ledger, "m1", "m2") == {"m1": S.STORED, "m2": S.DELIVERED}


async def test_a_stale_transition_is_handed_to_the_store_which_ignores_it(
    ledger: Ledger, recorder: Recorder
) -> None:
    (m1,) = await stored(ledger, "m1")
    await asyncio.wait_for(recorder.write([Transition.of(m1, S.READ)]), TIMEOUT)
    await asyncio.wait_for(recorder.write([Transition.of(m1, S.DELIVERED)]), TIMEOUT)
    assert await states(ledger, "m1") == {"m1": S.READ}


async def test_what_waits_is_written_once_when_run_is_cancelled(ledger: Ledger) -> None:
    m1, m2, m3 = await stored(ledger, "m1", "m2", "m3")
    recorder = Recorder(ledger, max_batch=2)
    task = asyncio.create_task(recorder.run())
    await spin()  # run() waits for work
    writing = asyncio.create_task(recorder.write([Transition.of(m3, S.READ)]))
    await asyncio.sleep(0)  # the write has queued its transition; run() has not woken yet
    recorder.record(Transition.of(m1, S.DELIVERED))
    recorder.record(Transition.of(m2, S.READ))
    task.cancel()  # before run() has taken any of them
    assert ledger.calls == []
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    await asyncio.wait_for(writing, TIMEOUT)
    # Every transition that waited is written, once, in batches of at most two.
    assert sorted((t for batch in ledger.batches for t in batch), key=lambda t: t.id) == [
        Transition.of(m1, S.DELIVERED),
        Transition.of(m2, S.READ),
        Transition.of(m3, S.READ),
    ]
    assert [len(batch) for batch in ledger.batches] == [2, 1]
    assert await states(ledger, "m1", "m2", "m3") == {
        "m1": S.DELIVERED,
        "m2": S.READ,
        "m3": S.READ,
    }


async def test_cancelled_mid_write_the_batch_in_flight_fails_and_the_rest_is_written(
    ledger: Ledger,
) -> None:
    m1, m2 = await stored(ledger, "m1", "m2")
    recorder = Recorder(ledger)
    task = asyncio.create_task(recorder.run())
    gate = Gate()
    ledger.before["record"] = gate
    in_flight = asyncio.create_task(recorder.write([Transition.of(m1, S.DELIVERED)]))
    await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    waiting = asyncio.create_task(recorder.write([Transition.of(m2, S.READ)]))
    await spin()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    # The cancelled write's outcome is unknown: its waiters hear so.
    with pytest.raises(StoreUnavailable, match="the recorder stopped"):
        await asyncio.wait_for(in_flight, TIMEOUT)
    await asyncio.wait_for(waiting, TIMEOUT)
    assert ledger.batches == [[Transition.of(m1, S.DELIVERED)], [Transition.of(m2, S.READ)]]
    assert await states(ledger, "m1", "m2") == {"m1": S.STORED, "m2": S.READ}


async def test_nothing_waiting_nothing_is_written_on_cancellation(ledger: Ledger) -> None:
    recorder = Recorder(ledger)
    task = asyncio.create_task(recorder.run())
    await spin()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert "record" not in ledger.calls
