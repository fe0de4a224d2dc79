"""The recorder: state transitions, written off the paths that cause them, in batches.

A session's writer must never wait on the database, and many connections
acknowledge at once: both hand their transitions to the recorder, which
coalesces them per message (only the furthest state is written; the states
in between may be skipped, as the protocol allows) and writes each batch
with one ``Store.record``. The first transition into an idle recorder is
written at once; those that arrive meanwhile make the next batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from tidings.engine import Store
from tidings.errors import StoreUnavailable
from tidings.metrics import Metrics
from tidings.models import Transition
from tidings.states import advances

log = logging.getLogger("tidings.recorder")

Key = tuple[str, str, str]


class Recorder:
    """Batches transitions for one store; ``run`` is its one task, owned by the app.

    A batch holds at most ``max_batch`` messages, so that one write stays well
    within the database's time budget however far behind the recorder is. With
    ``metrics`` it counts each state it is handed, when it is not behind one
    that still waits for the same message.
    """

    def __init__(self, store: Store, max_batch: int = 256, metrics: Metrics | None = None) -> None:
        self._store = store
        self._max_batch = max_batch
        self._counts = metrics.messages if metrics is not None else None
        self._waiting: dict[Key, Transition] = {}
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()

    def record(self, transition: Transition) -> None:
        """Queue ``transition`` to be written; nobody waits for it."""
        key = (transition.recipient, transition.sender, transition.id)
        queued = self._waiting.get(key)
        if queued is None or advances(queued.state, transition.state):
            self._waiting[key] = transition
            if self._counts is not None:
                self._counts[transition.state] += 1
        self._wake.set()

    async def write(self, transitions: Sequence[Transition]) -> None:
        """Queue ``transitions`` and wait until they are written.

        Raises ``StoreUnavailable`` when the database did not take them in time.
        """
        loop = asyncio.get_running_loop()
        futures = []
        for transition in transitions:
            self.record(transition)
            future: asyncio.Future[None] = loop.create_future()
            key = (transition.recipient, transition.sender, transition.id)
            self._waiters.setdefault(key, []).append(future)
            futures.append(future)
        # Shielded: a caller that goes away must not cancel what others wait on.
        await asyncio.shield(asyncio.gather(*futures))

    async def run(self) -> None:
        """Write batches until cancelled; then write what is still waiting, once."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    await self._flush()
        finally:
            while self._waiting:  # Batches of max_batch: every one of them, once.
                await self._flush()

    async def _flush(self) -> None:
        keys = list(self._waiting)[: self._max_batch]
        batch = [self._waiting.pop(key) for key in keys]
        waiters = [future for key in keys for future in self._waiters.pop(key, ())]
        try:
            await self._store.record(batch)
        except StoreUnavailable as exc:
            log.warning("record_failed", extra={"count": len(batch), "error": str(exc)})
            _settle(waiters, exc)
        except BaseException:
            _settle(waiters, StoreUnavailable("the recorder stopped"))
            raise
        else:
            _settle(waiters, None)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
            future.exception()  # Retrieved: its waiter may have gone.
