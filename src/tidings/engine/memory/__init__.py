"""The embedded engine: users, messages and presence in this process's memory.

Built for memory, not a mock of MongoDB: dictionaries and the indexes that the
access paths need, so every operation costs the same whatever an inbox holds.
Each inbox (``inbox``) keeps its messages by position, a map by sender
and id, and the positions of messages not yet delivered. Writes report
themselves to the in-process ``MemoryFeed`` (``feed``). Nothing
survives the process: the app says so loudly at start-up.
"""

from __future__ import annotations

from tidings.engine.base import Engine
from tidings.engine.memory.feed import MemoryFeed
from tidings.engine.memory.presence import MemoryPresence
from tidings.engine.memory.store import Clock, MemoryStore
from tidings.models import utcnow

__all__ = ["MemoryFeed", "MemoryPresence", "MemoryStore", "memory_engine"]


def memory_engine(retention: float | None = None, clock: Clock = utcnow) -> Engine:
    """A fresh embedded engine; ``retention``: seconds finished messages are kept."""
    feed = MemoryFeed()
    return Engine("memory", MemoryStore(feed, retention, clock), feed, MemoryPresence())
