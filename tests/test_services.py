"""Services: the drain that SIGTERM starts, on the memory engine, sessions on fake transports."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.fakes import BOB, TIMEOUT, World, spin, until
from tidings.auth import DevAuthenticator
from tidings.config import Settings
from tidings.connection import Connection, ReadAhead
from tidings.errors import CloseCode
from tidings.handlers import Handlers
from tidings.services import Services

RESTART = (CloseCode.SERVICE_RESTART, "server restarting; reconnect")


def services_of(world: World, drain_delay: float, write_timeout: float = 5.0) -> Services:
    deadline = drain_delay + 60.0  # long enough to be no part of these tests
    return Services(
        settings=Settings(
            dev=True,
            drain_delay=drain_delay,
            write_timeout=write_timeout,
            drain_deadline=deadline,
        ),
        engine=world.engine,
        hub=world.hub,
        recorder=world.recorder,
        handlers=Handlers(world.store, world.presence, world.recorder, 100),
        authenticator=DevAuthenticator(),
    )


async def test_drain_turns_unready_first_and_closes_nothing_before_drain_delay(
    world: World,
) -> None:
    services = services_of(world, drain_delay=3600)
    session, transport = world.session()
    services.connections.add(Connection(session, ReadAhead(8)))
    draining = asyncio.create_task(services.drain())
    await spin()
    assert services.draining is True
    assert transport.closes == []
    assert not session.closed.is_set()
    draining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await draining


async def test_drain_flushes_then_closes_every_session_with_1012(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tidings.services")
    services = services_of(world, drain_delay=0, write_timeout=TIMEOUT)
    (one, one_transport), (two, two_transport) = world.session(), world.session()
    user = await world.store.inner.ensure_user(BOB)
    await two.identify(user, None)
    services.connections.update({Connection(one, ReadAhead(8)), Connection(two, ReadAhead(8))})
    one_transport.flowing.clear()  # frames wait in the queue when the drain begins
    for n in range(3):
        one.push({"type": "#pong", "ts": n})
    draining = asyncio.create_task(services.drain())
    await until(lambda: two_transport.closes != [])
    assert one_transport.closes == []  # still flushing
    one_transport.flowing.set()
    await asyncio.wait_for(draining, TIMEOUT)
    assert [f["ts"] for f in one_transport.frames()] == [0, 1, 2]
    for transport in (one_transport, two_transport):
        assert transport.closes == [RESTART]
    assert one.closed.is_set()
    assert two.closed.is_set()
    assert world.hub.online() == []
    (record,) = [r for r in caplog.records if r.getMessage() == "draining"]
    assert record.__dict__["connections"] == 2


async def test_drain_closes_a_client_that_does_not_read_after_write_timeout(
    world: World,
) -> None:
    services = services_of(world, drain_delay=0, write_timeout=0.05)
    session, transport = world.session()  # its write_timeout is far longer
    services.connections.add(Connection(session, ReadAhead(8)))
    transport.flowing.clear()  # never reads again
    session.push({"type": "#pong", "ts": 0})
    await asyncio.wait_for(services.drain(), TIMEOUT)
    assert transport.closes == [RESTART]
    assert session.closed.is_set()


async def test_drain_with_no_connection_ends(world: World) -> None:
    services = services_of(world, drain_delay=0)
    await asyncio.wait_for(services.drain(), TIMEOUT)
    assert services.draining is True


async def test_drain_drops_frames_read_ahead_and_lets_the_one_in_hand_finish(
    world: World,
) -> None:
    services = services_of(world, drain_delay=0, write_timeout=TIMEOUT)
    session, transport = world.session()
    reads = ReadAhead(8)
    for n in range(3):
        reads.add(f"frame {n}")
    release = asyncio.Event()

    async def handling() -> None:  # a frame in hand, waiting on the database
        await release.wait()
        session.push({"type": "#pong", "ts": "answered"})

    connection = Connection(session, reads, asyncio.create_task(handling()))
    services.connections.add(connection)
    draining = asyncio.create_task(services.drain())
    await until(lambda: reads.stopped)
    assert not reads.waiting  # read ahead, not handled: dropped
    reads.add("read after the drain began")
    assert not reads.waiting
    await spin()
    assert transport.closes == []  # the frame in hand is not cut off
    release.set()
    await asyncio.wait_for(draining, TIMEOUT)
    assert [f["ts"] for f in transport.frames()] == ["answered"]
    assert transport.closes == [RESTART]


async def test_drain_cancels_a_handler_still_running_when_its_time_is_up(world: World) -> None:
    # The deadline leaves the frames in hand nothing beyond the shutdown's share.
    services = Services(
        settings=Settings(dev=True, drain_delay=0, mongodb_timeout=0.01, drain_deadline=1.03),
        engine=world.engine,
        hub=world.hub,
        recorder=world.recorder,
        handlers=Handlers(world.store, world.presence, world.recorder, 100),
        authenticator=DevAuthenticator(),
    )
    session, transport = world.session()

    async def forever() -> None:
        await asyncio.Event().wait()

    stuck = asyncio.create_task(forever())
    services.connections.add(Connection(session, ReadAhead(8), stuck))
    await asyncio.wait_for(services.drain(), TIMEOUT)
    assert stuck.cancelled()
    assert transport.closes == [RESTART]
