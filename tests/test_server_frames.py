"""What the server sends (``tidings.server_frames``): the builders, and their models."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from tests.fakes import ALICE, BOB, message
from tidings.errors import ErrorCode
from tidings.models import StateChanged, User, collection_for
from tidings.server_frames import (
    SERVER_FRAMES,
    change_frame,
    email_reply,
    encode,
    error_frame,
    message_frame,
    pong,
    rfc3339,
    state_frame,
    user_record,
    user_reply,
)
from tidings.states import MessageState

S = MessageState


# --- server frames ----------------------------------------------------------------------


def test_rfc3339_naive_is_taken_as_utc() -> None:
    assert rfc3339(datetime(2026, 5, 14, 12, 30, 1, 123456)) == "2026-05-14T12:30:01.123Z"


def test_rfc3339_aware_is_converted_to_utc() -> None:
    cest = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2026, 5, 14, 14, 30, 1, 5000, tzinfo=cest)) == (
        "2026-05-14T12:30:01.005Z"
    )
    assert rfc3339(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000Z"


def test_state_frame_without_failure() -> None:
    moment = datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)
    assert state_frame("m1", S.SENT, moment) == {
        "type": "state",
        "id": "m1",
        "state": "sent",
        "at": "2026-01-01T00:00:00.250Z",
    }
    # code and reason only belong to ``failed``
    assert "code" not in state_frame("m1", S.STORED, moment, "not_found", "why")


def test_state_frame_failed_carries_code_and_reason() -> None:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    frame_ = state_frame("m1", S.FAILED, moment, "not_found", "no user x@y.z")
    assert frame_["state"] == "failed"
    assert (frame_["code"], frame_["reason"]) == ("not_found", "no user x@y.z")


def test_state_frame_failed_has_defaults() -> None:
    frame_ = state_frame("m1", S.FAILED, datetime(2026, 1, 1, tzinfo=UTC))
    assert frame_["code"] == "internal"
    assert frame_["reason"] == "the message could not be stored"


def test_error_frame() -> None:
    assert error_frame(ErrorCode.NOT_FOUND, "no such thing", "m1") == {
        "type": "error",
        "code": "not_found",
        "message": "no such thing",
        "ref": "m1",
    }
    assert error_frame(ErrorCode.BAD_JSON, "bad")["ref"] is None


def test_encode_is_compact_json_text() -> None:
    text = encode({"type": "#pong", "ts": None, "n": "é"})
    assert isinstance(text, str)
    assert orjson.loads(text) == {"type": "#pong", "ts": None, "n": "é"}
    assert " " not in text


# --- User -------------------------------------------------------------------------------


def test_user_public_is_the_protocol_user_object() -> None:
    user = User(id="u1", email=ALICE, name="alice", collection=collection_for(ALICE))
    assert user_record(user, online=False) == {
        "id": "u1",
        "email": ALICE,
        "name": "alice",
        "collection": collection_for(ALICE),
        "online": False,
    }
    assert user_record(user, online=True)["online"] is True


# --- Message ----------------------------------------------------------------------------


def test_message_frame_is_the_message_frame_of_the_protocol() -> None:
    sent = message(mid="m2", sender=ALICE, recipient=BOB, state=MessageState.SENT, position=8)
    assert message_frame(sent) == {
        "type": "message",
        "id": "m2",
        "from": ALICE,
        "to": BOB,
        "content": "hello",
        "sent_at": "2026-01-02T03:04:00.567Z",
        "state": "sent",
    }


def test_message_frame_writes_naive_and_other_zone_times_in_utc() -> None:
    naive = dataclasses.replace(message(), sent_at=datetime(2026, 1, 2, 3, 4, 0, 567000))
    assert message_frame(naive)["sent_at"] == "2026-01-02T03:04:00.567Z"
    zone = datetime(2026, 1, 2, 7, 4, 0, 567890, tzinfo=timezone(timedelta(hours=2)))
    shifted = dataclasses.replace(message(), sent_at=zone)
    assert message_frame(shifted)["sent_at"] == "2026-01-02T05:04:00.567Z"


# --- every builder against its model ------------------------------------------------------

AT = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
USER = User(id="u1", email=ALICE, name="alice", collection=collection_for(ALICE))


def built() -> list[dict[str, Any]]:
    """One frame from every builder, in every shape it takes."""
    frames = [email_reply(USER), pong(None), pong({"n": 1}), user_reply(USER, online=False)]
    frames += [
        message_frame(message(state=state))
        for state in MessageState
        if state.value in ("stored", "sent", "delivered", "read")
    ]
    frames += [state_frame("m1", state, AT) for state in MessageState]
    frames.append(state_frame("m1", MessageState.FAILED, AT, "not_found", "no user x@y.z"))
    frames.append(change_frame(StateChanged(ALICE, "m1", MessageState.READ, AT)))
    frames += [error_frame(code, "why", ref) for code in ErrorCode for ref in (None, "m1")]
    return frames


def conforms(frame: dict[str, Any]) -> type[BaseModel]:
    """The model of ``SERVER_FRAMES`` that ``frame`` validates against; fails if none does."""
    problems = []
    for model in SERVER_FRAMES[frame["type"]]:
        try:
            model.model_validate(frame)
        except ValidationError as exc:
            problems.append(str(exc))
        else:
            return model
    pytest.fail(f"{frame} matches no model of its type: {problems}")


@pytest.mark.parametrize("frame", built(), ids=lambda frame: str(frame["type"]))
def test_every_builder_makes_a_frame_its_model_describes(frame: dict[str, Any]) -> None:
    model = conforms(frame)
    # Every field the model requires is present, and nothing else: the model
    # forbids extra fields, and this checks the other way round.
    names = {field.alias or name for name, field in model.model_fields.items()}
    assert set(frame) == names


def test_every_type_the_models_describe_has_a_builder() -> None:
    assert {frame["type"] for frame in built()} == set(SERVER_FRAMES)


def test_a_field_a_model_does_not_know_is_refused() -> None:
    (model,) = SERVER_FRAMES["#pong"]
    with pytest.raises(ValidationError):
        model.model_validate({**pong(1), "extra": True})


def test_user_record_copies_the_record() -> None:
    renamed = dataclasses.replace(USER, name="al")
    assert user_record(renamed, online=True)["name"] == "al"
    assert email_reply(USER)["user"] == user_record(USER, online=True)
    assert user_reply(USER, online=False) == {"type": "#user", "user": user_record(USER, False)}
