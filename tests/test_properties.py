"""Property-based: no frame a client can send crashes a connection or reaches another's data."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect

from tests.asyncapi_check import server_frame
from tests.helpers import TIMEOUT, ThreadedServer
from tidings.config import Settings
from tidings.emails import normalise_email
from tidings.models import collection_for

SECRET = "property-tests-secret-0123456789abcdef"
VICTIM, FRIEND, ATTACKER = "victim@example.com", "friend@example.com", "attacker@example.com"
VICTIM_SECRET = "VICTIM-SECRET-CONTENT"
# Closing for abuse is allowed; an internal error never is.
ABUSE_CLOSES = {1008, 1009}


def token(email: str) -> str:
    return jwt.encode({"email": email, "exp": int(time.time()) + 3600}, SECRET, "HS256")


def open_as(url: str, email: str) -> ClientConnection:
    return connect(
        url,
        additional_headers={"Authorization": f"Bearer {token(email)}"},
        open_timeout=TIMEOUT,
        max_size=2**22,
    )


def frames(ws: ClientConnection, until: dict[str, Any]) -> list[dict[str, Any]]:
    """Frames up to and including ``until``."""
    seen: list[dict[str, Any]] = []
    while True:
        seen.append(server_frame(ws.recv(timeout=TIMEOUT)))
        if seen[-1] == until:
            return seen


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A server with authentication on, where the victim has a private message waiting."""
    with ThreadedServer(Settings(jwt_secret=SECRET, rate_limit=10_000, rate_burst=10_000)) as up:
        with open_as(up.url, VICTIM) as victim, open_as(up.url, FRIEND) as friend:
            victim.send(json.dumps({"type": "#email", "email": VICTIM}))
            friend.send(json.dumps({"type": "#email", "email": FRIEND}))
            friend.send(
                json.dumps(
                    {"type": "message", "to": VICTIM, "content": VICTIM_SECRET, "id": "private"}
                )
            )
            friend.send(json.dumps({"type": "#ping", "ts": "done"}))
            frames(friend, {"type": "#pong", "ts": "done"})
        yield up.url


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
interesting = st.sampled_from(
    [VICTIM, VICTIM.upper(), FRIEND, ATTACKER, "private", {"$ne": None}, {"$gt": ""}, "", 2**80]
)
field_values = json_values | interesting
frame_types = st.sampled_from(["#email", "#ping", "#user", "message", "ack", "read"]) | st.text()
hostile_frames = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"type": frame_types},
        optional=dict.fromkeys(
            ("email", "since", "to", "content", "id", "from", "ts", "sender"), field_values
        ),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frame=hostile_frames, identify_first=st.booleans())
def test_no_frame_crashes_a_connection_or_reveals_another_users_data(
    server: str, frame: Any, identify_first: bool
) -> None:
    close: Close | None = None
    with open_as(server, ATTACKER) as ws:
        if identify_first:
            ws.send(json.dumps({"type": "#email", "email": ATTACKER}))
        ws.send(json.dumps(frame))
        ws.send(json.dumps({"type": "#ping", "ts": "after"}))
        try:
            received = frames(ws, {"type": "#pong", "ts": "after"})
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                raise AssertionError(f"dropped without a close frame: {closed}") from closed
            close = closed.rcvd
            received = []
    if close is not None:
        assert close.code in ABUSE_CLOSES, close
    for reply in received:
        assert VICTIM_SECRET not in json.dumps(reply)
        assert not (reply.get("type") == "error" and reply.get("code") == "internal"), reply
        assert reply.get("type") != "message", reply  # Nobody wrote to the attacker.


emails = st.emails() | st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(min_size=1, max_size=30).filter(lambda s: "@" not in s),
    st.text(min_size=1, max_size=30).filter(lambda s: "@" not in s),
)


def normalised(email: str) -> str | None:
    try:
        return normalise_email(email)
    except ValueError:
        return None


@given(first=emails, second=emails)
def test_every_e_mail_maps_to_a_valid_and_distinct_collection_name(first: str, second: str) -> None:
    one, two = normalised(first), normalised(second)
    for email in (one, two):
        if email is not None:
            # Valid in every MongoDB namespace, and in nx-27017's stricter one.
            assert re.fullmatch(r"m_[0-9a-f]{64}", collection_for(email))
    if one is not None and two is not None:
        assert (collection_for(one) == collection_for(two)) == (one == two)
