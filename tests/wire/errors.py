"""Command errors as MongoDB answers them: ``ok: 0`` with a code, its name and labels."""

from __future__ import annotations

from typing import Any

CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    11: "UserNotFound",
    26: "NamespaceNotFound",
    27: "IndexNotFound",
    43: "CursorNotFound",
    59: "CommandNotFound",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    189: "PrimarySteppedDown",
    237: "CursorKilled",
    260: "InvalidResumeToken",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    11000: "DuplicateKey",
}


class CommandError(Exception):
    """A command that fails: the server answers ``ok: 0`` with this code and these labels."""

    def __init__(self, code: int, message: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.labels = labels

    def reply(self) -> dict[str, Any]:
        """The error document MongoDB sends."""
        doc: dict[str, Any] = {
            "ok": 0.0,
            "errmsg": str(self),
            "code": self.code,
            "codeName": CODE_NAMES.get(self.code, "UnknownError"),
        }
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        return doc
