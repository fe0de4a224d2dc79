"""The outbox alone: the soft-bounded queue, state superseding, the writer and its watchdog.

An ``Outbox`` on a fake transport, with what it reports (transitions to record,
progress, a stuck client) kept in lists, and its writer a task of the test's
(``Owner``), as it is the session's in the app. A client that does not read is
a transport whose ``flowing`` is cleared; time bounds (``write_timeout``,
``flush``) are bounds, never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tests.fakes import TIMEOUT, FakeTransport, GoneTransport, message, spin, until
from tidings.errors import ErrorCode
from tidings.metrics import Metrics
from tidings.models import Transition
from tidings.outbox import BURST, TOLD, Outbox
from tidings.server_frames import message_frame
from tidings.states import MessageState

Frame = dict[str, Any]


class Owner:
    """What a session is to its outbox: it owns the writer task and hears every report."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.recorded: list[Transition] = []
        self.progress = 0
        self.stuck: list[str] = []
        self.reported_stuck = asyncio.Event()
        self.outboxes: list[Outbox] = []

    def outbox(
        self,
        transport: FakeTransport | None = None,
        queue_size: int = 64,
        write_timeout: float = TIMEOUT,
        metrics: Metrics | None = None,
    ) -> tuple[Outbox, FakeTransport]:
        transport = transport or FakeTransport()
        outbox = Outbox(
            transport,
            self.recorded.append,
            queue_size=queue_size,
            write_timeout=write_timeout,
            spawn=self.spawn,
            on_progress=self.progressed,
            on_stuck=self.stuck_client,
            metrics=metrics,
        )
        self.outboxes.append(outbox)
        return outbox, transport

    async def stalled(self, queue_size: int) -> tuple[Outbox, FakeTransport]:
        """An outbox whose client stopped reading with a pong (``ts`` 0) in the writer's hands."""
        outbox, transport = self.outbox(queue_size=queue_size)
        transport.flowing.clear()
        outbox.push({"type": "#pong", "ts": 0})
        await until(lambda: transport.attempts == 1)
        return outbox, transport

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        task = asyncio.create_task(work())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def progressed(self) -> None:
        self.progress += 1

    def stuck_client(self, why: str) -> None:
        self.stuck.append(why)
        self.reported_stuck.set()


@pytest.fixture
async def owner() -> AsyncIterator[Owner]:
    """An owner whose writers are cancelled after the test, as ``Session.stop`` does."""
    owner = Owner()
    yield owner
    for outbox in owner.outboxes:
        outbox.close()
    for task in list(owner.tasks):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rest(outbox: Outbox, transport: FakeTransport, marker: str = "end") -> list[Frame]:
    """Every frame written from now up to a pong pushed now: what was still to come."""
    outbox.push({"type": "#pong", "ts": marker})
    return await transport.recv_until(lambda f: f.get("ts") == marker)


def state(mid: str, value: str) -> Frame:
    return {"type": "state", "id": mid, "state": value, "at": "2026-01-02T03:04:05.000Z"}


# --- the queue and the writer -----------------------------------------------------------


async def test_pushed_frames_leave_in_order(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    for n in range(20):
        outbox.push({"type": "#pong", "ts": n})
    frames = [await transport.recv() for _ in range(20)]
    assert [f["ts"] for f in frames] == list(range(20))


async def test_messages_and_frames_share_one_queue_in_order(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    outbox.push({"type": "#pong", "ts": 0})
    outbox.push_message(message("m1", position=1))
    outbox.push(state("m0", "read"))
    outbox.push_message(message("m2", position=2))
    frames = await rest(outbox, transport)
    assert [(f["type"], f.get("id")) for f in frames] == [
        ("#pong", None),
        ("message", "m1"),
        ("state", "m0"),
        ("message", "m2"),
        ("#pong", None),
    ]
    assert frames[1] == message_frame(message("m1", position=1))


async def test_an_idle_outbox_holds_no_task(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    assert not outbox.writing
    outbox.push({"type": "#pong", "ts": 1})
    assert outbox.writing  # started by the first frame, as a task of the owner's
    assert len(owner.tasks) == 1
    await transport.recv()
    await until(lambda: not owner.tasks)
    assert not outbox.writing
    outbox.push({"type": "#pong", "ts": 2})  # and started again by the next one
    assert (await transport.recv())["ts"] == 2


async def test_only_messages_written_as_stored_are_marked_sent(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    stored = message("m1", state=MessageState.STORED, position=1)
    outbox.push_message(stored)
    outbox.push_message(message("m2", state=MessageState.SENT, position=2))
    outbox.push_message(message("m3", state=MessageState.READ, position=3))
    await rest(outbox, transport)
    assert owner.recorded == [Transition.of(stored, MessageState.SENT)]


async def test_a_message_is_marked_sent_only_once_written(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    transport.flowing.clear()
    outbox.push_message(message("m1", position=1))
    await until(lambda: transport.attempts == 1)
    await spin()
    assert owner.recorded == []  # in the writer's hands, not taken by the client yet
    transport.flowing.set()
    await transport.recv()
    assert [t.id for t in owner.recorded] == ["m1"]


async def test_connection_gone_closes_the_outbox_and_ends_the_writer_quietly(
    owner: Owner,
) -> None:
    outbox, transport = owner.outbox(GoneTransport())
    outbox.push_message(message("m1", position=1))
    await until(lambda: not outbox.writing)
    assert transport.attempts == 1
    assert outbox.closed
    outbox.push({"type": "#pong", "ts": 2})
    await spin()
    assert transport.attempts == 1  # nothing more is queued or written
    assert len(outbox) == 0
    assert owner.recorded == []  # never written, so never sent
    assert owner.stuck == []
    # Progress came as the frame left the queue; not once more for an end with nobody there.
    assert owner.progress == 1


# --- the soft bound, room, and the hard cap ---------------------------------------------


async def test_replies_are_always_queued_up_to_eight_times_the_queue(owner: Owner) -> None:
    outbox, transport = owner.outbox(queue_size=2)
    transport.flowing.clear()
    for n in range(16):  # replies are not dropped: the endpoint waits on room() instead
        outbox.push({"type": "#pong", "ts": n})
    await spin()
    assert owner.stuck == []
    assert outbox.full
    transport.flowing.set()
    assert [f["ts"] for f in await rest(outbox, transport)] == [*range(16), "end"]
    assert owner.stuck == []


async def test_more_than_eight_times_the_queue_waiting_reports_a_stuck_client(
    owner: Owner,
) -> None:
    outbox, transport = owner.outbox(queue_size=2)
    transport.flowing.clear()
    for n in range(16):
        outbox.push({"type": "#pong", "ts": n})
    assert owner.stuck == []  # the writer has not taken one yet: sixteen wait
    outbox.push({"type": "#pong", "ts": 16})
    assert owner.stuck == ["too many frames waiting to be sent"]
    assert len(outbox) == 17  # reported, not dropped: cutting is the owner's decision


async def test_room_is_there_until_the_queue_is_full(owner: Owner) -> None:
    outbox, transport = await owner.stalled(queue_size=2)  # ts 0 is not queued any more
    outbox.push({"type": "#pong", "ts": 1})
    assert not outbox.full
    await asyncio.wait_for(outbox.room(), TIMEOUT)
    outbox.push({"type": "#pong", "ts": 2})
    assert outbox.full
    assert len(outbox) == 2
    waiting = asyncio.create_task(outbox.room())
    await spin()
    assert not waiting.done()
    transport.flowing.set()
    await asyncio.wait_for(waiting, TIMEOUT)


async def test_a_closed_outbox_takes_nothing_and_wake_releases_who_waits_for_room(
    owner: Owner,
) -> None:
    outbox, transport = await owner.stalled(queue_size=1)
    outbox.push({"type": "#pong", "ts": 1})
    waiting = asyncio.create_task(outbox.room())
    await spin()
    assert not waiting.done()
    outbox.close()
    assert outbox.closed
    outbox.push({"type": "#pong", "ts": 2})
    outbox.push_message(message("m1", position=1))
    assert len(outbox) == 1  # neither was queued
    await asyncio.wait_for(outbox.room(), TIMEOUT)  # no room is awaited once closed
    assert not waiting.done()  # who waited already waits until woken
    outbox.wake()
    await asyncio.wait_for(waiting, TIMEOUT)
    transport.flowing.set()
    await until(lambda: not outbox.writing)
    assert [f["ts"] for f in transport.frames()] == [0]  # the writer stopped before ts 1


# --- state frames -----------------------------------------------------------------------


async def test_a_state_frame_is_kept_while_the_queue_is_not_behind(owner: Owner) -> None:
    outbox, transport = await owner.stalled(queue_size=4)
    outbox.push(state("m1", "stored"))
    outbox.push(state("m1", "sent"))  # one frame queued: less than half the queue
    transport.flowing.set()
    frames = await rest(outbox, transport)
    assert [(f["type"], f.get("state")) for f in frames] == [
        ("#pong", None),
        ("state", "stored"),
        ("state", "sent"),
        ("#pong", None),
    ]


async def test_a_state_frame_is_superseded_by_a_later_one_when_the_queue_is_behind(
    owner: Owner,
) -> None:
    outbox, transport = await owner.stalled(queue_size=4)
    outbox.push({"type": "#pong", "ts": 1})
    outbox.push({"type": "#pong", "ts": 2})  # half the queue waits
    outbox.push(state("m1", "stored"))
    outbox.push(state("m2", "stored"))
    outbox.push(state("m1", "sent"))  # replaces m1's stored, which is still queued
    outbox.push(state("m1", "read"))  # and this replaces sent
    transport.flowing.set()
    frames = await rest(outbox, transport)
    assert [(f.get("id"), f.get("state"), f.get("ts")) for f in frames] == [
        (None, None, 0),
        (None, None, 1),
        (None, None, 2),
        ("m2", "stored", None),
        ("m1", "read", None),
        (None, None, "end"),
    ]


async def test_in_a_burst_received_gives_way_to_stored_and_alone_it_does_not(
    owner: Owner,
) -> None:
    outbox, transport = await owner.stalled(queue_size=256)
    # A client that sent one message: both answers, though both wait.
    outbox.push(state("m0", "received"))
    outbox.push(state("m0", "stored"))
    # A burst: received for many messages, then their stored answers.
    burst = [f"b{n}" for n in range(BURST)]
    for mid in burst:
        outbox.push(state(mid, "received"))
    for mid in burst:
        outbox.push(state(mid, "stored"))
    # Only received gives way in a burst: sent and delivered are recorded states.
    outbox.push(state("b0", "sent"))
    transport.flowing.set()
    frames = await rest(outbox, transport)
    assert [(f.get("id"), f.get("state")) for f in frames] == [
        (None, None),
        ("m0", "received"),
        ("m0", "stored"),
        *[(mid, "stored") for mid in burst],
        ("b0", "sent"),
        (None, None),
    ]


async def test_a_state_behind_one_already_queued_is_dropped_and_a_repeat_is_kept(
    owner: Owner,
) -> None:
    outbox, transport = owner.outbox()
    outbox.push(state("m1", "delivered"))  # the answer to a resend: the current state
    outbox.push(state("m1", "sent"))  # the feed, late: behind it
    outbox.push(state("m1", "received"))  # the next resend's answers
    outbox.push(state("m1", "delivered"))
    outbox.push(state("m2", "sent"))  # another message is another story
    outbox.push(state("m1", "read"))
    frames = await rest(outbox, transport)
    assert [(f.get("id"), f.get("state")) for f in frames] == [
        ("m1", "delivered"),
        ("m1", "received"),
        ("m1", "delivered"),
        ("m2", "sent"),
        ("m1", "read"),
        (None, None),
    ]


async def test_an_outbox_remembers_the_states_of_its_most_recent_messages_only(
    owner: Owner,
) -> None:
    outbox, transport = owner.outbox()
    outbox.push(state("old", "delivered"))
    for n in range(TOLD):
        outbox.push(state(f"n{n}", "stored"))
    outbox.push(state("old", "sent"))  # forgotten, so no longer known to be behind
    frames = await rest(outbox, transport)
    assert frames[-2] == state("old", "sent")


# --- progress, the watchdog, and flushing -------------------------------------------------


async def test_progress_is_reported_with_half_the_queue_or_less_waiting_and_when_empty(
    owner: Owner,
) -> None:
    outbox, transport = await owner.stalled(queue_size=4)
    assert owner.progress == 1  # it left an empty queue
    for n in range(1, 5):
        outbox.push({"type": "#pong", "ts": n})
    transport.flowing.set()
    await until(lambda: not outbox.writing)
    # Four left behind them 3 (more than half), 2, 1 and 0; then the queue was empty.
    assert owner.progress == 1 + 3 + 1
    assert [f["ts"] for f in transport.frames()] == [0, 1, 2, 3, 4]


async def test_a_client_that_takes_no_frame_for_write_timeout_is_reported_stuck(
    owner: Owner,
) -> None:
    outbox, transport = owner.outbox(write_timeout=0.05)
    transport.flowing.clear()
    outbox.push({"type": "#pong", "ts": 1})
    await asyncio.wait_for(owner.reported_stuck.wait(), TIMEOUT)
    assert owner.stuck == ["no frame taken for 0.05 seconds"]
    assert transport.sent == []
    # Reported, not acted on: cutting the client is the owner's decision.
    assert outbox.writing
    assert not outbox.closed


async def test_flush_waits_until_what_is_queued_is_written(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    await asyncio.wait_for(outbox.flush(TIMEOUT), TIMEOUT)  # nothing to write: at once
    transport.flowing.clear()
    for n in range(3):
        outbox.push({"type": "#pong", "ts": n})
    flushing = asyncio.create_task(outbox.flush(TIMEOUT))
    await spin()
    assert not flushing.done()
    transport.flowing.set()
    await asyncio.wait_for(flushing, TIMEOUT)
    assert [f["ts"] for f in transport.frames()] == [0, 1, 2]
    assert not outbox.writing


async def test_flush_gives_up_after_its_time(owner: Owner) -> None:
    outbox, transport = owner.outbox()
    transport.flowing.clear()  # a client that never reads
    outbox.push({"type": "#pong", "ts": 0})
    await asyncio.wait_for(outbox.flush(0.05), TIMEOUT)
    assert outbox.writing
    assert transport.sent == []


# --- what it counts -----------------------------------------------------------------------


async def test_frames_are_counted_once_written_and_latency_on_first_delivery_only(
    owner: Owner,
) -> None:
    metrics = Metrics()
    outbox, transport = owner.outbox(metrics=metrics)
    outbox.push_message(message("m1", position=1))  # live
    outbox.push_message(message("m2", position=2), backlog=True)
    outbox.push_message(message("m0", state=MessageState.SENT))  # a redelivery
    outbox.push(state("m9", "delivered"))
    outbox.push({"type": "error", "code": ErrorCode.NOT_FOUND.value, "message": "no", "ref": "x"})
    await rest(outbox, transport)
    assert metrics.delivery[False].count == 1
    assert metrics.delivery[True].count == 1
    assert metrics.frames_out["message"] == 3
    assert metrics.frames_out["state"] == 1
    assert metrics.frames_out["error"] == 1
    assert metrics.frames_out["#pong"] == 1
    assert metrics.error_frames["not_found"] == 1


async def test_a_frame_never_written_is_not_counted_as_sent(owner: Owner) -> None:
    metrics = Metrics()
    outbox, transport = owner.outbox(metrics=metrics)
    transport.flowing.clear()
    outbox.push({"type": "#pong", "ts": 0})
    await until(lambda: transport.attempts == 1)
    outbox.push_message(message("m1"))
    outbox.close()
    transport.flowing.set()
    await until(lambda: not outbox.writing)
    assert metrics.frames_out["#pong"] == 1
    assert metrics.frames_out["message"] == 0
    assert metrics.delivery[False].count == 0
