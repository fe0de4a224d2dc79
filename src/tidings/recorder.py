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

from tidings.engine import Store
from tidings.errors import StoreUnavailable
from tidings.models import Transition
from tidings.protocol import advances

log = logging.getLogger("tidings.recorder")

Key = tuple[str, str, str]


class Recorder:
    """Batches transitions for one store; ``run`` is its one task, owned by the app."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: dict[Key, Transition] = {}
        self._written = _batch_future()
        self._wake = asyncio.Event()

    def record(self, transition: Transition) -> asyncio.Future[None]:
        """Queue ``transition``; the future settles once the batch carrying it is written.

        Callers that do not need to know (a writer marking ``sent``) ignore it.
        """
        key = (transition.recipient, transition.sender, transition.id)
        queued = self._waiting.get(key)
        if queued is None or advances(queued.state, transition.state):
            self._waiting[key] = transition
        self._wake.set()
        return self._written

    async def run(self) -> None:
        """Write batches until cancelled; then write what is still waiting, once."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    await self._flush()
        finally:
            if self._waiting:
                await self._flush()

    async def _flush(self) -> None:
        batch = list(self._waiting.values())
        self._waiting.clear()
        written, self._written = self._written, _batch_future()
        try:
            await self._store.record(batch)
        except StoreUnavailable as exc:
            log.warning("record_failed", extra={"count": len(batch), "error": str(exc)})
            written.set_exception(exc)
        except BaseException:
            written.set_exception(StoreUnavailable("the recorder stopped"))
            raise
        else:
            written.set_result(None)


def _batch_future() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Often nobody waits on a batch; a failure is logged by the recorder itself.
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
