"""The frames the server sends, described as pydantic models.

These models are the contract, not the code path: the server builds its frames as
plain dicts (``state_frame`` and ``error_frame`` in ``protocol``, ``Message.frame`` in
``models``, the ``#email``, ``#pong`` and ``#user`` replies in ``handlers``), since
building and dumping a model for every outgoing frame would cost the hot path
several microseconds a frame. The models feed ``docs/asyncapi.yaml``
(``tidings.asyncapi``), and the end-to-end tests check every frame a real server
sends against that document, which is what keeps the dicts and these models from
drifting apart.

Every field is required, even when it may be ``null``: the server always sends it.
Extra fields are forbidden, so that a field added to a dict without being added
here fails the end-to-end tests instead of going undocumented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from tidings.errors import ErrorCode
from tidings.ids import ID_PATTERN

# What the server sends is already normalised: trimmed and lower-cased, no white space.
SentEmail = Annotated[
    str,
    Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$", examples=["alice@example.com"]),
]
SentId = Annotated[str, Field(pattern=ID_PATTERN, examples=["m1"])]
# ``rfc3339``: UTC, always with milliseconds and a ``Z``.
Timestamp = Annotated[
    str,
    Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$",
        json_schema_extra={"format": "date-time"},
        examples=["2026-11-26T23:24:41.012Z"],
    ),
]
# States a ``state`` frame reports short of ``failed``; ``failed`` has a model of its own.
Progress = Literal["received", "stored", "sent", "delivered", "read"]


class _ServerFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserRecord(_ServerFrame):
    """USER: a user's public record."""

    id: str = Field(description="random hex, assigned when the user first identifies")
    email: SentEmail
    name: str = Field(description="the part of the e-mail before '@'")
    collection: str = Field(
        pattern=r"^m_[0-9a-f]{64}$", description="'m_' and the SHA-256 of the e-mail"
    )
    online: bool = Field(description="whether any server holds an identified connection of it")


class EmailReply(_ServerFrame):
    """``#email``: the connection is identified; the backlog and live messages follow."""

    type: Literal["#email"]
    email: SentEmail
    user: UserRecord


class PongReply(_ServerFrame):
    """``#pong``: the answer to ``#ping``, echoing its ``ts`` (``null`` if it had none)."""

    type: Literal["#pong"]
    ts: Annotated[Any, WithJsonSchema({"description": "any JSON value, as the #ping sent it"})]


class UserReply(_ServerFrame):
    """``#user``: the user a ``#user`` frame asked for."""

    type: Literal["#user"]
    user: UserRecord


class MessageFrame(_ServerFrame):
    """``message``: a message for this connection's user, live, from the backlog or replayed.

    ``state`` is the state the message had when it was read: ``stored`` for a live
    message, ``stored`` or ``sent`` in the backlog, any of the four through ``since``.
    """

    type: Literal["message"]
    id: SentId
    sender: SentEmail = Field(alias="from")
    to: SentEmail
    content: str = Field(min_length=1)
    sent_at: Timestamp
    state: Literal["stored", "sent", "delivered", "read"]


class StateFrame(_ServerFrame):
    """``state``: a message of this user's moved forward; later states imply earlier ones."""

    type: Literal["state"]
    id: SentId
    state: Progress
    at: Timestamp


class FailedStateFrame(_ServerFrame):
    """``state`` ``failed``: the message could not be stored, and never will be."""

    type: Literal["state"]
    id: SentId
    state: Literal["failed"]
    at: Timestamp
    code: ErrorCode
    reason: str


class ErrorFrame(_ServerFrame):
    """``error``: one frame was refused; the connection stays open.

    ``ref`` is the refused frame's id when it had a valid one, else its type, and
    ``null`` when it had no usable type or the database failed.
    """

    type: Literal["error"]
    code: ErrorCode
    message: str
    ref: str | None


# The server frames by ``type``; a type with several models lists each shape it takes.
SERVER_FRAMES: dict[str, tuple[type[BaseModel], ...]] = {
    "#email": (EmailReply,),
    "#pong": (PongReply,),
    "#user": (UserReply,),
    "message": (MessageFrame,),
    "state": (StateFrame, FailedStateFrame),
    "error": (ErrorFrame,),
}
