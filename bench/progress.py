"""Progress lines for long runs: what is done, at what pace, and how long is left."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextlib.asynccontextmanager
async def ticking(line: Callable[[float], str], every: float) -> AsyncIterator[None]:
    """Print ``line(elapsed)`` every ``every`` seconds while the block runs.

    Printed as whole lines, not a bar redrawn in place: ``make`` output is
    often read from a log, where carriage returns only garble it.
    """
    started = time.monotonic()

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            print(line(time.monotonic() - started), flush=True)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
