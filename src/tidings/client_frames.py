"""What a client may send: the frames of wire protocol v1, and their validation.

What the server sends is in ``server_frames``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from tidings.emails import normalise_email
from tidings.errors import ErrorCode, FrameRefused
from tidings.ids import ID, ID_PATTERN, ID_RULE
from tidings.limits import depth


def _check_id(value: str) -> str:
    if not ID.fullmatch(value):
        raise ValueError(f"must be {ID_RULE}")
    return value


# WithJsonSchema only describes the fields in docs/asyncapi.yaml; validation is unchanged.
MessageId = Annotated[
    str, AfterValidator(_check_id), WithJsonSchema({"type": "string", "pattern": ID_PATTERN})
]
Email = Annotated[
    str,
    AfterValidator(normalise_email),
    WithJsonSchema(
        {
            "type": "string",
            "description": "an e-mail address, local@domain with no white space and at "
            "most 254 characters once trimmed; its ASCII letters are lower-cased before use",
            "examples": ["alice@example.com"],
        }
    ),
]


class _Frame(BaseModel):
    # Strict: a number where a string belongs is an error, not a silent coercion.
    # Unknown fields are ignored so that newer clients can talk to older servers.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class EmailFrame(_Frame):
    """``#email``: identify as ``email`` and start streaming its messages."""

    type: Literal["#email"]
    email: Email
    since: MessageId | None = None


class PingFrame(_Frame):
    """``#ping``: an application-level heartbeat, echoed as ``#pong``."""

    type: Literal["#ping"]
    ts: Any = None


class UserFrame(_Frame):
    """``#user``: look up a user's public record."""

    type: Literal["#user"]
    email: Email


class SendFrame(_Frame):
    """``message``: send ``content`` to ``to``."""

    type: Literal["message"]
    to: Email
    content: str = Field(
        min_length=1,
        description="at most TIDINGS_MAX_CONTENT_CHARS (16384) characters; "
        "a longer one is refused with too_large",
    )
    id: MessageId | None = None


class AckFrame(_Frame):
    """``ack`` / ``read``: the recipient has the message / has read it.

    ``from`` is optional; it is needed only when two senders used the same id.
    """

    type: Literal["ack", "read"]
    id: MessageId
    sender: Email | None = Field(default=None, alias="from")


ClientFrame = EmailFrame | PingFrame | UserFrame | SendFrame | AckFrame

_MODELS: dict[str, type[_Frame]] = {
    "#email": EmailFrame,
    "#ping": PingFrame,
    "#user": UserFrame,
    "message": SendFrame,
    "ack": AckFrame,
    "read": AckFrame,
}


def parse_frame(data: str | bytes, max_depth: int = 32) -> ClientFrame:
    """Decode and validate one client frame, or raise the ``FrameRefused`` that says why not."""
    if isinstance(data, bytes):
        raise FrameRefused(ErrorCode.INVALID, "frames must be JSON text frames, not binary")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameRefused(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FrameRefused(ErrorCode.INVALID, "a frame must be a JSON object with a 'type'")
    # A frame with few brackets cannot nest deeply: counting them is much
    # cheaper than walking the document, and true of nearly every frame.
    brackets = data.count("{") + data.count("[")
    if brackets > max_depth and depth(raw, max_depth) > max_depth:
        raise FrameRefused(ErrorCode.INVALID, f"a frame may nest at most {max_depth} levels deep")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise FrameRefused(ErrorCode.INVALID, "a frame needs a string 'type' field")
    model = _MODELS.get(kind)
    if model is None:
        known = ", ".join(sorted(_MODELS))
        raise FrameRefused(
            ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}; known types: {known}", kind
        )
    try:
        frame = model.model_validate(raw)
    except ValidationError as exc:
        raise FrameRefused(ErrorCode.INVALID, _describe(exc), _ref(raw, kind)) from None
    assert isinstance(frame, ClientFrame)
    return frame


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "frame"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"'{field}': {message}")
    return "; ".join(problems)


def _ref(raw: dict[str, Any], kind: str) -> str:
    """What an error frame should point at: the frame's id when it has a usable one."""
    frame_id = raw.get("id")
    if isinstance(frame_id, str) and ID.fullmatch(frame_id):
        return frame_id
    return kind
