"""The one place where the driver's errors become Tidings' own."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from pymongo.errors import PyMongoError

from tidings.errors import StoreUnavailable

P = ParamSpec("P")
R = TypeVar("R")


def guarded(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Report a database that does not answer in time as ``StoreUnavailable``.

    Past the storage seam nobody sees a PyMongo type, its errors included.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except PyMongoError as exc:
            raise StoreUnavailable(f"database error: {exc}") from exc

    return wrapper
