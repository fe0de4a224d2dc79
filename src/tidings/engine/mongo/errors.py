"""The one place where the driver's errors become Tidings' own, and the engine's own error.

Past the storage seam nobody sees a PyMongo type, its errors included: every
driver error becomes ``StoreUnavailable`` here (``unavailable``), whether a
store call (``guarded``) or opening the engine (``mapped``) raised it.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

from pymongo.errors import PyMongoError, ServerSelectionTimeoutError

from tidings.errors import StoreUnavailable, TidingsError

P = ParamSpec("P")
R = TypeVar("R")


class StreamClosed(TidingsError):
    """A change stream ended without an invalidate event; the feed resumes it, never the core."""


# What follows the reason in a server selection timeout: the driver's timeouts
# and its whole topology description, hundreds of characters for one server.
_SELECTION_DETAIL = re.compile(r" \(configured timeouts:[^)]*\)|, Timeout: .*$", re.DOTALL)


def reason(exc: PyMongoError) -> str:
    """The driver's reason for ``exc``, on one line and without its topology description."""
    text = str(exc)
    if isinstance(exc, ServerSelectionTimeoutError):
        text = _SELECTION_DETAIL.sub("", text)
    return " ".join(text.split())


@contextlib.contextmanager
def mapped() -> Iterator[None]:
    """Raise a driver error inside the block as ``StoreUnavailable``, with the driver's reason."""
    try:
        yield
    except PyMongoError as exc:
        raise StoreUnavailable(f"database error: {reason(exc)}") from exc


def guarded(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """``method`` with its driver errors ``mapped``: a database that does not answer in time."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with mapped():
            return await method(*args, **kwargs)

    return wrapper
