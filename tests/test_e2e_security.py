"""End to end: authentication, authorization, origins and limits on a real server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.helpers import client, serve
from tests.processes import serving
from tidings.config import Settings

pytestmark = pytest.mark.e2e

SECRET = "s3cret-for-tests-only-0123456789abcdef"
ISSUER = "https://issuer.example"
AUDIENCE = "tidings-tests"
ALICE = "alice@example.com"
BOB = "bob@example.com"
MALLORY = "mallory@example.com"


def token(email: str | None, *, secret: str = SECRET, **claims: Any) -> str:
    """A client token; override or drop claims with keyword arguments (None drops)."""
    now = int(time.time())
    body: dict[str, Any] = {"email": email, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, "HS256")


def secure(**overrides: Any) -> Settings:
    """Settings with HS256 authentication and the test issuer and audience."""
    fields: dict[str, Any] = {
        "jwt_secret": SECRET,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        **overrides,
    }
    return Settings(**fields)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serve(secure()) as running:
        yield running


def with_token(raw: str) -> dict[str, Any]:
    """Client options that send ``raw`` in the Authorization header."""
    return {"additional_headers": {"Authorization": f"Bearer {raw}"}}


def bearer(email: str) -> dict[str, Any]:
    """Client options that authenticate as ``email``."""
    return with_token(token(email))


async def refused(url: str, **options: Any) -> int:
    """The HTTP status a refused handshake got."""
    with pytest.raises(InvalidStatus) as refusal:
        async with client(url, **options):
            pass
    status: int = refusal.value.response.status_code
    return status


# --- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="no token"),
        pytest.param(with_token("not.a.jwt"), id="garbage"),
        pytest.param(with_token(token(ALICE, secret="x" * 40)), id="forged"),
        pytest.param(with_token(token(ALICE, exp=1)), id="expired"),
        pytest.param(with_token(token(ALICE, aud="other")), id="wrong audience"),
        pytest.param(with_token(token(ALICE, iss="evil")), id="wrong issuer"),
        pytest.param(with_token(token(ALICE, exp=None)), id="no expiry"),
        pytest.param(with_token(token(None, sub=None)), id="no e-mail"),
    ],
)
async def test_a_bad_or_missing_token_is_refused_before_accept(
    url: str, options: dict[str, Any]
) -> None:
    assert await refused(url, **options) == 403


async def test_the_token_may_come_in_the_authorization_header(url: str) -> None:
    async with client(url, **bearer(ALICE)) as ws:
        await ws.identify(ALICE)


async def test_the_token_may_come_as_a_bearer_subprotocol(url: str) -> None:
    offered = [cast(Subprotocol, f"bearer.{token(ALICE)}")]
    async with client(url, subprotocols=offered) as ws:
        assert ws.ws.subprotocol == offered[0]
        await ws.identify(ALICE)


async def test_an_offered_app_subprotocol_is_chosen_over_echoing_the_token(url: str) -> None:
    offered = [Subprotocol("tidings.v1"), cast(Subprotocol, f"bearer.{token(ALICE)}")]
    async with client(url, subprotocols=offered) as ws:
        assert ws.ws.subprotocol == "tidings.v1"
        await ws.identify(ALICE)


async def test_the_token_may_come_as_a_query_parameter(url: str) -> None:
    async with client(f"{url}?access_token={token(ALICE)}") as ws:
        await ws.identify(ALICE)


async def test_the_e_mail_claim_is_compared_case_insensitively(url: str) -> None:
    async with client(url, **bearer("Alice@Example.COM")) as ws:
        reply = await ws.identify("ALICE@example.com")
        assert reply["email"] == ALICE


async def test_a_connection_ends_when_its_token_expires(url: str) -> None:
    # Expired 7 s ago: still inside the 10 s leeway, so accepted, for some 3 seconds.
    almost = token(ALICE, exp=int(time.time()) - 7)
    async with client(url, **with_token(almost)) as ws:
        await ws.identify(ALICE)
        close = await ws.close_frame()
        assert close.code == 1008
        assert "token expired" in close.reason


# --- authorization ---------------------------------------------------------------------


async def test_identifying_as_someone_else_is_forbidden(url: str) -> None:
    async with client(url, **bearer(MALLORY)) as ws:
        await ws.send({"type": "#email", "email": ALICE})
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("forbidden", "#email")
        await ws.send({"type": "#ping"})
        assert (await ws.recv())["type"] == "#pong"
        await ws.identify(MALLORY)


async def test_nobody_acks_or_reads_a_message_addressed_to_someone_else(url: str) -> None:
    async with (
        client(url, **bearer(ALICE)) as alice,
        client(url, **bearer(BOB)) as bob,
        client(url, **bearer(MALLORY)) as mallory,
    ):
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await mallory.identify(MALLORY)
        await alice.send_message(BOB, "for bob only", id="private")
        assert (await bob.recv())["content"] == "for bob only"
        assert await alice.states("private", until="sent") == ["received", "stored", "sent"]

        for kind in ("ack", "read"):
            await mallory.send({"type": kind, "id": "private", "from": ALICE})
            error = await mallory.recv()
            assert (error["code"], error["ref"]) == ("not_found", "private")
        # A later message that Bob acknowledges: Alice hears of it, and of nothing before.
        await alice.send_message(BOB, "later", id="later")
        assert (await bob.recv())["id"] == "later"
        await bob.send({"type": "ack", "id": "later"})
        frames = await alice.recv_until(lambda f: f.get("state") == "delivered")
        assert {f["id"] for f in frames} == {"later"}  # no 'delivered' or 'read' of 'private'


async def test_user_lookup_returns_only_public_fields(url: str) -> None:
    async with client(url, **bearer(ALICE)) as alice, client(url, **bearer(BOB)) as bob:
        await alice.identify(ALICE)
        await bob.identify(BOB)
        await bob.send({"type": "#user", "email": ALICE})
        user = (await bob.recv())["user"]
        assert set(user) == {"id", "email", "name", "collection", "online"}


OPERATOR = {"$ne": None}
OPERATOR_FRAMES = [
    {"type": "#email", "email": OPERATOR},
    {"type": "#email", "email": ALICE, "since": OPERATOR},
    {"type": "#user", "email": OPERATOR},
    {"type": "message", "to": OPERATOR, "content": "x"},
    {"type": "message", "to": BOB, "content": OPERATOR},
    {"type": "message", "to": BOB, "content": "x", "id": OPERATOR},
    {"type": "ack", "id": OPERATOR},
    {"type": "ack", "id": "x", "from": OPERATOR},
    {"type": "read", "id": {"$gt": ""}},
    {"type": "read", "id": "x", "from": {"$regex": ".*"}},
    {"type": OPERATOR},
]


@pytest.mark.parametrize("frame", OPERATOR_FRAMES)
async def test_operator_objects_in_any_field_are_invalid(url: str, frame: dict[str, Any]) -> None:
    async with client(url, **bearer(ALICE)) as ws:
        if frame["type"] != "#email":
            await ws.identify(ALICE)
        await ws.send(frame)
        error = await ws.recv()
        assert (error["type"], error["code"]) == ("error", "invalid")


# --- origins ---------------------------------------------------------------------------


async def test_a_foreign_origin_is_refused_and_the_own_origin_accepted(url: str) -> None:
    assert await refused(url, origin="https://evil.example", **bearer(ALICE)) == 403
    own = url.replace("ws://", "http://").removesuffix("/ws")
    async with client(url, origin=own, **bearer(ALICE)) as ws:
        await ws.identify(ALICE)


async def test_configured_origins_are_the_only_ones_allowed() -> None:
    async with serve(secure(allowed_origins="https://app.example")) as url:
        async with client(url, origin="https://app.example", **bearer(ALICE)) as ws:
            await ws.identify(ALICE)
        own = url.replace("ws://", "http://").removesuffix("/ws")
        assert await refused(url, origin=own, **bearer(ALICE)) == 403


# --- limits ----------------------------------------------------------------------------


async def test_an_oversize_frame_closes_with_1009() -> None:
    async with serve(secure(max_frame_bytes=1024)) as url, client(url, **bearer(ALICE)) as ws:
        await ws.identify(ALICE)
        await ws.send({"type": "message", "to": ALICE, "content": "x" * 2048})
        close = await ws.close_frame()
        assert close.code == 1009


async def test_a_flood_is_rate_limited_then_closed_with_1008() -> None:
    limits = {"rate_limit": 5.0, "rate_burst": 5, "rate_abuse": 30}
    async with serve(secure(**limits)) as url, client(url, **bearer(ALICE)) as ws:
        await ws.identify(ALICE)
        for n in range(60):
            await ws.send({"type": "#ping", "ts": n})
        frames: list[dict[str, Any]] = []
        close = await ws.close_frame(into=frames)
        assert close.code == 1008
        assert "rate limit" in close.reason
        codes = {f.get("code") for f in frames if f["type"] == "error"}
        assert codes == {"rate_limited"}
        assert any(f["type"] == "#pong" for f in frames)


async def test_a_connection_that_never_identifies_is_closed() -> None:
    async with serve(secure(identify_timeout=0.3)) as url, client(url, **bearer(ALICE)) as ws:
        close = await ws.close_frame()
        assert close.code == 1008
        assert "identify" in close.reason


async def test_deeply_nested_frames_are_invalid(url: str) -> None:
    async with client(url, **bearer(ALICE)) as ws:
        await ws.identify(ALICE)
        nested = '{"type": "#ping", "ts": ' + "[" * 40 + "]" * 40 + "}"
        await ws.send(nested)
        error = await ws.recv()
        assert (error["code"], error["ref"]) == ("invalid", None)
        assert "nest" in error["message"]


# --- secrets stay out of logs ----------------------------------------------------------


async def test_tokens_never_reach_the_logs(tmp_path: Path) -> None:
    good, bad = token(ALICE), token(ALICE, exp=1)
    async with serving(
        tmp_path,
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        log_level="DEBUG",
    ) as served:
        async with client(f"{served.url}?access_token={good}") as ws:
            await ws.identify(ALICE)
        assert await refused(served.url, **with_token(bad)) == 403
        offered = [cast(Subprotocol, f"bearer.{good}")]
        async with client(served.url, subprotocols=offered) as ws:
            await ws.identify(ALICE)
    assert "handshake_refused" in served.log
    assert "connection_opened" in served.log
    for secret in (good, bad, SECRET):
        assert secret not in served.log
