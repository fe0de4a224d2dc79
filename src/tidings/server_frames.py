"""What the server sends: every frame, once as a builder and once as a model.

The builders make the plain dicts the server writes: building and dumping a
pydantic model for every outgoing frame would cost the hot path several
microseconds a frame. The models describe the same frames for
``docs/asyncapi.yaml`` (``tidings.asyncapi``). Both live here so that a field
is added in one file; ``tests/test_server_frames.py`` checks every builder's
output against its model, and the end-to-end tests check every frame a real
server sends against the document.

Every field of a model is required, even when it may be ``null``: the server
always sends it. Extra fields are forbidden, so that a field added to a
builder without being added to its model fails the tests instead of going
undocumented.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from tidings.errors import ErrorCode
from tidings.ids import ID_PATTERN
from tidings.models import Message, StateChanged, User
from tidings.states import MessageState

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


# The builders. Each makes the dict its model above describes.


@functools.lru_cache(maxsize=1024)
def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision, the precision stores keep.

    Memoised: at load, many frames carry the same millisecond.
    """
    if moment.tzinfo is None:  # A naive datetime from a store is UTC.
        moment = moment.replace(tzinfo=UTC)
    elif moment.utcoffset():
        moment = moment.astimezone(UTC)
    # The offset of a UTC time is "+00:00": six characters that become "Z".
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


def encode(frame: dict[str, Any]) -> str:
    """Serialise a server frame to the text of a WebSocket frame."""
    return orjson.dumps(frame).decode()


def user_record(user: User, online: bool) -> dict[str, Any]:
    """USER (``UserRecord``): a user's public record, ``online`` as looked up."""
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "collection": user.collection,
        "online": online,
    }


def email_reply(user: User) -> dict[str, Any]:
    """``#email`` (``EmailReply``): this connection is ``user``'s, who is therefore online."""
    return {"type": "#email", "email": user.email, "user": user_record(user, True)}


def pong(ts: Any) -> dict[str, Any]:
    """``#pong`` (``PongReply``), echoing the ``#ping``'s ``ts``."""
    return {"type": "#pong", "ts": ts}


def user_reply(user: User, online: bool) -> dict[str, Any]:
    """``#user`` (``UserReply``): the user a ``#user`` frame asked for."""
    return {"type": "#user", "user": user_record(user, online)}


def message_frame(message: Message) -> dict[str, Any]:
    """``message`` (``MessageFrame``): a message pushed to its recipient."""
    return {
        "type": "message",
        "id": message.id,
        "from": message.sender,
        "to": message.recipient,
        "content": message.content,
        "sent_at": rfc3339(message.sent_at),
        "state": message.state.value,
    }


def state_frame(
    message_id: str,
    state: MessageState,
    at: datetime,
    code: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """``state`` (``StateFrame``, ``FailedStateFrame``); ``failed`` carries a code and reason."""
    frame: dict[str, Any] = {"type": "state", "id": message_id, "state": state.value}
    frame["at"] = rfc3339(at)
    if state is MessageState.FAILED:
        frame["code"] = code or ErrorCode.INTERNAL.value
        frame["reason"] = reason or "the message could not be stored"
    return frame


def change_frame(change: StateChanged) -> dict[str, Any]:
    """The ``state`` frame that tells a sender of a state change the feed brought."""
    return state_frame(change.id, change.state, change.at)


def error_frame(code: ErrorCode, message: str, ref: str | None = None) -> dict[str, Any]:
    """``error`` (``ErrorFrame``); ``ref`` names the offending frame when there is one."""
    return {"type": "error", "code": code.value, "message": message, "ref": ref}
