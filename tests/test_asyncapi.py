"""docs/asyncapi.yaml: up to date, valid AsyncAPI 3.0, complete, and true to the docs."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft7Validator

from tests.asyncapi_check import DOCUMENT, check_server_frame, resolve, validators
from tidings.asyncapi import RECEIVE, SEND, client_frames, render
from tidings.cli import main
from tidings.client_frames import _MODELS
from tidings.errors import ErrorCode
from tidings.models import Message, Position
from tidings.server_frames import SERVER_FRAMES, error_frame, message_frame, state_frame
from tidings.states import MessageState

DATA = Path(__file__).parent / "data"
PROTOCOL_MD = DOCUMENT.parent / "protocol.md"
REGENERATE = "run `tidings asyncapi --output docs/asyncapi.yaml` and commit the result"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The committed document, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return loaded


def test_the_committed_document_is_what_the_models_generate() -> None:
    committed = DOCUMENT.read_text(encoding="utf-8")
    assert committed == render(), f"docs/asyncapi.yaml is out of date: {REGENERATE}"


def test_rendering_is_deterministic() -> None:
    assert render() == render()


def test_it_is_valid_asyncapi_3_0(document: dict[str, Any]) -> None:
    # The official schema, vendored from @asyncapi/specs (see tests/data/README.md).
    schema = json.loads((DATA / "asyncapi-3.0.0.json").read_text(encoding="utf-8"))
    validator = Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]
    assert errors == []


def test_the_official_schema_would_catch_a_broken_document(document: dict[str, Any]) -> None:
    schema = json.loads((DATA / "asyncapi-3.0.0.json").read_text(encoding="utf-8"))
    broken = {
        **document,
        "operations": {RECEIVE: {**document["operations"][RECEIVE], "action": "publish"}},
    }
    assert not Draft7Validator(schema).is_valid(broken)


def test_it_names_the_package_version(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["version"] == metadata.version("tidings")


def _messages_of(document: dict[str, Any], operation: str) -> dict[str, dict[str, Any]]:
    """The messages an operation lists, by frame type; each resolved to its component."""
    found: dict[str, dict[str, Any]] = {}
    for reference in document["operations"][operation]["messages"]:
        message = resolve(document, resolve(document, reference["$ref"])["$ref"])
        found[message["name"]] = message
    return found


def test_every_client_frame_is_a_message_the_server_receives(document: dict[str, Any]) -> None:
    received = _messages_of(document, RECEIVE)
    assert set(received) == set(_MODELS) == set(client_frames())
    for kind, model in _MODELS.items():
        payload = received[kind]["payload"]
        assert payload == {"$ref": f"#/components/schemas/{model.__name__}"}, kind
        assert kind in resolve(document, payload["$ref"])["properties"]["type"].get("enum", [kind])


def test_every_server_frame_is_a_message_the_server_sends(document: dict[str, Any]) -> None:
    sent = _messages_of(document, SEND)
    assert (
        set(sent) == set(SERVER_FRAMES) == {"#email", "#pong", "#user", "message", "state", "error"}
    )
    schemas = document["components"]["schemas"]
    for shapes in SERVER_FRAMES.values():
        for model in shapes:
            assert model.__name__ in schemas
            assert schemas[model.__name__]["additionalProperties"] is False, model


def test_every_message_is_on_the_channel(document: dict[str, Any]) -> None:
    channel = document["channels"]["ws"]
    assert channel["address"] == "/ws"
    assert set(channel["messages"]) == set(document["components"]["messages"])


def test_the_frame_builders_send_what_the_contract_says() -> None:
    at = datetime(2026, 11, 26, 23, 24, 41, 12000, tzinfo=UTC)
    for state in MessageState:
        check_server_frame(state_frame("m1", state, at))
    check_server_frame(state_frame("m1", MessageState.FAILED, at, "not_found", "no user x@y"))
    for code in ErrorCode:
        check_server_frame(error_frame(code, "why", None))
        check_server_frame(error_frame(code, "why", "#email"))
    for state in (MessageState.STORED, MessageState.SENT, MessageState.READ):
        message = Message(Position(1), "m1", "a@example.com", "b@example.com", "hi", at, state)
        check_server_frame(message_frame(message))


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        pytest.param({"type": "hello"}, "does not describe", id="unknown-type"),
        pytest.param(["#pong"], "does not describe", id="not-an-object"),
        pytest.param({"type": "#pong"}, "'ts' is a required property", id="missing-field"),
        pytest.param({"type": "#pong", "ts": 1, "extra": 2}, "extra", id="extra-field"),
        pytest.param(
            {"type": "state", "id": "m1", "state": "sent", "at": "2026-11-26T23:24:41Z"},
            "does not match",
            id="no-milliseconds",
        ),
        pytest.param(
            {"type": "error", "code": "oops", "message": "m", "ref": None},
            "is not one of",
            id="unknown-code",
        ),
    ],
)
def test_the_check_refuses_what_the_contract_does_not_describe(frame: Any, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint) as info:
        check_server_frame(frame)
    assert repr(frame) in str(info.value)


def _documented_server_frames() -> list[dict[str, Any]]:
    """Every whole server frame quoted in docs/protocol.md: ``<-`` lines and the error table."""
    frames = []
    for line in PROTOCOL_MD.read_text(encoding="utf-8").splitlines():
        if "…" in line:  # shortened: not a whole frame
            continue
        quoted = re.search(r"<- (\{.*\})", line) or re.search(
            r"`(\{\"type\":\"error\",\"code\":\".*?\})`", line
        )
        if quoted:
            frames.append(orjson.loads(quoted.group(1)))
    return frames


def test_the_frames_quoted_in_protocol_md_match_the_contract() -> None:
    frames = _documented_server_frames()
    assert {frame["type"] for frame in frames} == set(validators())
    for frame in frames:
        check_server_frame(frame)


def test_the_command_prints_or_writes_the_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["asyncapi"]) == 0
    assert capsys.readouterr().out == render()
    target = tmp_path / "asyncapi.yaml"
    assert main(["asyncapi", "--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render()
