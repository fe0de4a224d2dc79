"""What a client may send: frame parsing and validation (``tidings.client_frames``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tidings.client_frames import AckFrame, EmailFrame, PingFrame, SendFrame, UserFrame, parse_frame
from tidings.emails import normalise_email
from tidings.errors import ErrorCode, FrameRefused
from tidings.states import MessageState

S = MessageState
ORDER = [S.RECEIVED, S.STORED, S.SENT, S.DELIVERED, S.READ]


def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


def refused(data: str | bytes) -> FrameRefused:
    with pytest.raises(FrameRefused) as info:
        parse_frame(data)
    return info.value


# --- every frame type -------------------------------------------------------------------


def test_email_frame_is_parsed_and_the_email_normalised() -> None:
    parsed = parse_frame(frame(type="#email", email="  Alice@Example.COM "))
    assert parsed == EmailFrame(type="#email", email="alice@example.com", since=None)


def test_email_frame_carries_since() -> None:
    parsed = parse_frame(frame(type="#email", email="a@b.io", since="m-1_X"))
    assert isinstance(parsed, EmailFrame)
    assert parsed.since == "m-1_X"


def test_ping_frame_with_and_without_ts() -> None:
    assert parse_frame(frame(type="#ping")) == PingFrame(type="#ping", ts=None)
    parsed = parse_frame(frame(type="#ping", ts={"n": [1, 2]}))
    assert isinstance(parsed, PingFrame)
    assert parsed.ts == {"n": [1, 2]}


def test_user_frame() -> None:
    assert parse_frame(frame(type="#user", email="BOB@x.io")) == UserFrame(
        type="#user", email="bob@x.io"
    )


def test_send_frame_with_and_without_id() -> None:
    parsed = parse_frame(frame(type="message", to="Bob@X.io", content="hi"))
    assert parsed == SendFrame(type="message", to="bob@x.io", content="hi", id=None)
    parsed = parse_frame(frame(type="message", to="bob@x.io", content="hi", id="abc"))
    assert isinstance(parsed, SendFrame)
    assert parsed.id == "abc"


@pytest.mark.parametrize("kind", ["ack", "read"])
def test_ack_and_read_frames(kind: str) -> None:
    parsed = parse_frame(frame(type=kind, id="m1"))
    assert isinstance(parsed, AckFrame)
    assert (parsed.type, parsed.id, parsed.sender) == (kind, "m1", None)


def test_ack_frame_from_is_the_sender_normalised() -> None:
    parsed = parse_frame(frame(type="ack", id="m1", **{"from": " Alice@Example.com"}))
    assert isinstance(parsed, AckFrame)
    assert parsed.sender == "alice@example.com"


def test_unknown_fields_are_ignored() -> None:
    parsed = parse_frame(frame(type="#ping", ts=1, future="field"))
    assert parsed == PingFrame(type="#ping", ts=1)


def test_frames_are_immutable() -> None:
    parsed = parse_frame(frame(type="#ping"))
    assert isinstance(parsed, PingFrame)
    with pytest.raises(ValueError, match="frozen"):
        parsed.ts = 2
    assert parsed.ts is None


# --- error paths ------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["", "{", "not json", '{"type": "#ping",}', "{'a': 1}"])
def test_bad_json(data: str) -> None:
    error = refused(data)
    assert error.code is ErrorCode.BAD_JSON
    assert error.message.startswith("frame is not valid JSON")
    assert error.ref is None


def test_binary_frames_are_invalid() -> None:
    error = refused(b'{"type":"#ping"}')
    assert error.code is ErrorCode.INVALID
    assert "binary" in error.message


@pytest.mark.parametrize("data", ["[]", '["#ping"]', "1", '"#ping"', "null", "true"])
def test_non_object_is_invalid(data: str) -> None:
    error = refused(data)
    assert error.code is ErrorCode.INVALID
    assert "JSON object" in error.message
    assert error.ref is None


@pytest.mark.parametrize("data", ["{}", '{"email": "a@b.io"}', '{"type": null}', '{"type": 1}'])
def test_missing_or_non_string_type_is_invalid(data: str) -> None:
    error = refused(data)
    assert error.code is ErrorCode.INVALID
    assert "'type'" in error.message
    assert error.ref is None


@pytest.mark.parametrize("kind", ["", "#pong", "MESSAGE", "state", "email"])
def test_unknown_type(kind: str) -> None:
    error = refused(frame(type=kind))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.ref == kind
    # The message lists the types the server knows.
    for known in ("#email", "#ping", "#user", "ack", "message", "read"):
        assert known in error.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "#email", "email": 5}, "email"),
        ({"type": "#email", "email": "a@b.io", "since": 7}, "since"),
        ({"type": "#user", "email": ["a@b.io"]}, "email"),
        ({"type": "message", "to": "a@b.io", "content": 5}, "content"),
        ({"type": "message", "to": "a@b.io", "content": "x", "id": 12}, "id"),
        ({"type": "message", "to": None, "content": "x"}, "to"),
        ({"type": "ack", "id": 1}, "id"),
        ({"type": "read", "id": "m1", "from": 3}, "from"),
    ],
)
def test_wrong_field_types_are_not_coerced(fields: dict[str, Any], field: str) -> None:
    error = refused(orjson.dumps(fields).decode())
    assert error.code is ErrorCode.INVALID
    assert f"'{field}'" in error.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "#email"}, "email"),
        ({"type": "#user"}, "email"),
        ({"type": "message", "content": "x"}, "to"),
        ({"type": "message", "to": "a@b.io"}, "content"),
        ({"type": "ack"}, "id"),
    ],
)
def test_missing_required_fields(fields: dict[str, Any], field: str) -> None:
    error = refused(orjson.dumps(fields).decode())
    assert error.code is ErrorCode.INVALID
    assert f"'{field}'" in error.message


def test_empty_content_is_invalid() -> None:
    error = refused(frame(type="message", to="a@b.io", content=""))
    assert error.code is ErrorCode.INVALID
    assert "'content'" in error.message


@pytest.mark.parametrize("bad_id", ["", "a" * 65, "has space", "dot.ted", "slash/", "é", "a\n"])
def test_invalid_ids(bad_id: str) -> None:
    error = refused(frame(type="ack", id=bad_id))
    assert error.code is ErrorCode.INVALID
    assert error.message == "'id': must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"


@pytest.mark.parametrize("good_id", ["a", "A" * 64, "0-9_az-AZ"])
def test_valid_ids(good_id: str) -> None:
    parsed = parse_frame(frame(type="read", id=good_id))
    assert isinstance(parsed, AckFrame)
    assert parsed.id == good_id


@pytest.mark.parametrize(
    "bad_email",
    [
        "",
        "plain",
        "@example.com",
        "name@",
        "a@b@c",
        "a b@c.d",
        "a@b\tc",
        "a\x00@b.c",
        "a@" + "b" * 253,
    ],
)
def test_invalid_emails(bad_email: str) -> None:
    error = refused(frame(type="#email", email=bad_email))
    assert error.code is ErrorCode.INVALID
    assert error.message == "'email': must be an e-mail address like name@example.com"
    with pytest.raises(ValueError, match="e-mail address"):
        normalise_email(bad_email)


def test_email_normalisation() -> None:
    assert normalise_email("  MiXed.Case+tag@Example.ORG\n") == "mixed.case+tag@example.org"
    longest = "a@" + "b" * 252
    assert normalise_email(longest.upper()) == longest


def test_invalid_send_frame_refers_to_its_id() -> None:
    error = refused(frame(type="message", to="nobody", content="hi", id="m-7"))
    assert error.code is ErrorCode.INVALID
    assert error.ref == "m-7"


@pytest.mark.parametrize("bad_id", [7, "not valid!", None])
def test_error_ref_falls_back_to_the_type_without_a_usable_id(bad_id: object) -> None:
    error = refused(
        orjson.dumps({"type": "message", "to": "x", "content": "", "id": bad_id}).decode()
    )
    assert error.code is ErrorCode.INVALID
    assert error.ref == "message"


def test_several_problems_are_all_described() -> None:
    error = refused(frame(type="message", to="nobody", content=""))
    assert "'to'" in error.message
    assert "'content'" in error.message
    assert "; " in error.message
    assert "Value error" not in error.message


# --- nesting depth ----------------------------------------------------------------------


def ping_nested(levels: int) -> str:
    """A ``#ping`` frame nesting ``levels`` levels deep, the frame object included."""
    ts: Any = 1
    for _ in range(levels - 1):
        ts = [ts]
    return frame(type="#ping", ts=ts)


def test_a_frame_nested_deeper_than_the_limit_is_invalid() -> None:
    with pytest.raises(FrameRefused) as info:
        parse_frame(ping_nested(6), max_depth=5)
    assert info.value.code is ErrorCode.INVALID
    assert "5 levels" in info.value.message


def test_a_frame_nested_at_the_limit_is_accepted() -> None:
    parsed = parse_frame(ping_nested(5), max_depth=5)
    assert isinstance(parsed, PingFrame)
    assert parsed.ts == [[[[1]]]]


def test_the_default_depth_limit_is_32() -> None:
    assert isinstance(parse_frame(ping_nested(32)), PingFrame)
    error = refused(ping_nested(33))
    assert error.code is ErrorCode.INVALID
    assert "32 levels" in error.message


def test_the_depth_limit_counts_objects_too() -> None:
    ts: Any = {"a": {"b": [{"c": 1}]}}  # 4 levels under the frame: 5 in all
    assert isinstance(parse_frame(frame(type="#ping", ts=ts), max_depth=5), PingFrame)
    with pytest.raises(FrameRefused) as info:
        parse_frame(frame(type="#ping", ts=ts), max_depth=4)
    assert "4 levels" in info.value.message


def test_the_depth_limit_applies_before_the_type_is_known() -> None:
    with pytest.raises(FrameRefused) as info:
        parse_frame(frame(type="no-such-type", x=[[[[]]]]), max_depth=3)
    assert info.value.code is ErrorCode.INVALID
    assert "3 levels" in info.value.message


def test_only_ascii_letters_are_case_folded_so_look_alikes_stay_apart() -> None:
    # U+212A KELVIN SIGN lower-cases to "k" under Unicode rules.
    assert normalise_email("\u212aate@Example.COM") == "\u212aate@example.com"
    assert normalise_email("\u212aate@example.com") != normalise_email("kate@example.com")
    assert normalise_email("  Kate@Example.COM ") == "kate@example.com"
