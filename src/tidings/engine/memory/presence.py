"""The memory engine's presence: who is online, within this one process."""

from __future__ import annotations

from collections.abc import Sequence


class MemoryPresence:
    """Presence within this one process."""

    def __init__(self) -> None:
        self._online: set[str] = set()

    @property
    def refresh_interval(self) -> None:
        """Records in this process never expire: nothing to refresh."""
        return None

    async def is_online(self, email: str) -> bool:
        return email in self._online

    async def set(self, email: str, online: bool) -> None:
        if online:
            self._online.add(email)
        else:
            self._online.discard(email)

    async def refresh(self, emails: Sequence[str]) -> None:
        self._online.update(emails)
