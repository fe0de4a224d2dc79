"""End to end: every bad frame gets its error frame and the connection stays usable."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Client, client

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"


async def assert_still_usable(ws: Client) -> None:
    await ws.send({"type": "#ping", "ts": "still here"})
    assert await ws.recv() == {"type": "#pong", "ts": "still here"}


BEFORE_IDENTIFICATION = [
    ({"type": "message", "to": ALICE, "content": "hi", "id": "early"}, "early"),
    ({"type": "ack", "id": "early"}, "early"),
    ({"type": "read", "id": "early"}, "early"),
    ({"type": "#user", "email": ALICE}, "#user"),
]


@pytest.mark.parametrize(("frame", "ref"), BEFORE_IDENTIFICATION)
async def test_frames_before_identification_are_not_identified(
    server: str, frame: dict[str, Any], ref: str
) -> None:
    async with client(server) as ws:
        await ws.send(frame)
        error = await ws.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "not_identified", ref)
        assert "#email" in error["message"]
        await assert_still_usable(ws)


CRAFTED = [
    ("{not json", "bad_json", None, "not valid JSON"),
    ("[1, 2]", "invalid", None, "JSON object"),
    ('"just a string"', "invalid", None, "JSON object"),
    ("{}", "invalid", None, "'type'"),
    ('{"type": 7}', "invalid", None, "'type'"),
    ('{"type": "shout"}', "unknown_type", "shout", "known types"),
    ('{"type": "message", "content": "hi"}', "invalid", "message", "'to'"),
    ('{"type": "message", "to": "bob@example.com", "content": 5}', "invalid", "message", "content"),
    (
        '{"type": "message", "to": "bob@example.com", "content": ""}',
        "invalid",
        "message",
        "content",
    ),
    ('{"type": "message", "to": "not-an-email", "content": "x"}', "invalid", "message", "'to'"),
    (
        '{"type": "message", "to": "b@example.com", "content": "x", "id": "no spaces"}',
        "invalid",
        "message",
        "'id'",
    ),
    (
        '{"type": "message", "to": "b@example.com", "content": "x", "id": ""}',
        "invalid",
        "message",
        "'id'",
    ),
    (
        '{"type": "message", "to": "b@example.com", "content": "x", "id": 42}',
        "invalid",
        "message",
        "'id'",
    ),
    (
        '{"type": "message", "to": {"$ne": null}, "content": "x", "id": "op"}',
        "invalid",
        "op",
        "'to'",
    ),
    ('{"type": "ack"}', "invalid", "ack", "'id'"),
    ('{"type": "read", "id": "x".repeat}', "bad_json", None, "not valid JSON"),
    ('{"type": "#email"}', "invalid", "#email", "'email'"),
    ('{"type": "#user", "email": ["a@b.c"]}', "invalid", "#user", "'email'"),
    ('{"type": "#ping", "ts": 1e400}', "bad_json", None, "not valid JSON"),
]


@pytest.mark.parametrize(("raw", "code", "ref", "hint"), CRAFTED)
async def test_crafted_frames_get_their_error_code(
    server: str, raw: str, code: str, ref: str | None, hint: str
) -> None:
    async with client(server) as ws:
        await ws.identify(ALICE)
        await ws.send(raw)
        error = await ws.recv()
        assert error["type"] == "error"
        assert (error["code"], error["ref"]) == (code, ref)
        assert hint in error["message"]
        await assert_still_usable(ws)


async def test_binary_frames_are_invalid(server: str) -> None:
    async with client(server) as ws:
        await ws.ws.send(b'{"type": "#ping"}')
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("invalid", None)
        assert "text" in error["message"]
        await assert_still_usable(ws)


async def test_lookup_of_an_unknown_user_is_not_found(server: str) -> None:
    async with client(server) as ws:
        await ws.identify(ALICE)
        await ws.send({"type": "#user", "email": "ghost@example.com"})
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("not_found", "#user")
        await assert_still_usable(ws)


async def test_acking_an_unknown_message_is_not_found(server: str) -> None:
    async with client(server) as ws:
        await ws.identify(ALICE)
        await ws.send({"type": "ack", "id": "never-sent"})
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("not_found", "never-sent")
        await assert_still_usable(ws)


async def test_content_over_the_limit_is_too_large(server: str) -> None:
    async with client(server) as ws:
        await ws.identify(ALICE)
        await ws.send_message(ALICE, "x" * 16385, id="big")
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("too_large", "big")
        assert "16384" in error["message"]
        await assert_still_usable(ws)


async def test_a_second_identification_is_invalid(server: str) -> None:
    async with client(server) as ws:
        await ws.identify(ALICE)
        await ws.send({"type": "#email", "email": "mallory@example.com"})
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("invalid", "#email")
        assert ALICE in error["message"]
        await assert_still_usable(ws)


async def test_since_an_unknown_id_is_not_found_and_does_not_identify(server: str) -> None:
    async with client(server) as ws:
        await ws.send({"type": "#email", "email": ALICE, "since": "nothing"})
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("not_found", "nothing")
        await ws.identify(ALICE)
