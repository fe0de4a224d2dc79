"""Authentication: dev mode, refusing to run without any, JWT verification and origins."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.requests import HTTPConnection

from tidings.auth import (
    APP_SUBPROTOCOL,
    LEEWAY,
    DevAuthenticator,
    JWTAuthenticator,
    Principal,
    build_authenticator,
    origin_allowed,
)
from tidings.config import Settings
from tidings.errors import AuthFailed, ConfigError

SECRET = "s" * 32
OTHER_SECRET = "o" * 32


def connection(
    headers: dict[str, str] | None = None, query: str = "", protocols: str | None = None
) -> HTTPConnection:
    """A WebSocket handshake as Starlette sees it, from a minimal ASGI scope."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if protocols is not None:
        raw.append((b"sec-websocket-protocol", protocols.encode("latin-1")))
    return HTTPConnection(
        {
            "type": "websocket",
            "path": "/ws",
            "headers": raw,
            "query_string": query.encode("latin-1"),
            "scheme": "ws",
        }
    )


def bearer(token: str) -> HTTPConnection:
    return connection({"Authorization": f"Bearer {token}"})


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"email": "alice@example.com", "iat": now, "exp": now + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(secret: str = SECRET, headers: dict[str, Any] | None = None, **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm="HS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], key: bytes | None = None) -> str:
    """A token assembled by hand: what an attacker can send, whatever PyJWT would allow."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


def hs_authenticator(issuer: str | None = None, audience: str | None = None) -> JWTAuthenticator:
    authenticator = build_authenticator(
        Settings(jwt_secret=SECRET, jwt_issuer=issuer, jwt_audience=audience)
    )
    assert isinstance(authenticator, JWTAuthenticator)
    return authenticator


def refusal(authenticator: JWTAuthenticator, conn: HTTPConnection) -> str:
    with pytest.raises(AuthFailed) as info:
        authenticator.authenticate(conn)
    return str(info.value)


# --- keys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks(*entries: tuple[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]) -> str:
    keys = []
    for kid, key in entries:
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "RS256"
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "ES256"
        jwk["kid"] = kid
        keys.append(jwk)
    return json.dumps({"keys": keys})


@pytest.fixture
def rsa_authenticator(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> JWTAuthenticator:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(rsa_key))
    authenticator = build_authenticator(Settings(jwt_public_key_file=str(path)))
    assert isinstance(authenticator, JWTAuthenticator)
    return authenticator


@pytest.fixture
def jwks_authenticator(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> JWTAuthenticator:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("ec-1", ec_key)))
    authenticator = build_authenticator(Settings(jwt_jwks_file=str(path)))
    assert isinstance(authenticator, JWTAuthenticator)
    return authenticator


# --- dev mode and principals ------------------------------------------------------------


def test_dev_authenticator_lets_anyone_identify_as_anyone() -> None:
    principal = DevAuthenticator().authenticate(connection())
    assert principal == Principal(email=None)
    assert principal.may_identify("alice@example.com")
    assert principal.may_identify("bob@example.com")


def test_dev_authenticator_chooses_the_app_subprotocol_when_offered() -> None:
    principal = DevAuthenticator().authenticate(connection(protocols="x, tidings.v1"))
    assert principal == Principal(email=None, subprotocol=APP_SUBPROTOCOL)


def test_a_principal_with_an_email_may_only_be_that_email() -> None:
    principal = Principal(email="alice@example.com")
    assert principal.may_identify("alice@example.com")
    assert not principal.may_identify("bob@example.com")
    assert not principal.may_identify("ALICE@example.com")  # callers pass normalised e-mails


# --- build_authenticator ----------------------------------------------------------------


def test_build_authenticator_in_dev_mode_warns(caplog: pytest.LogCaptureFixture) -> None:
    authenticator = build_authenticator(Settings(dev=True))
    assert isinstance(authenticator, DevAuthenticator)
    warnings = [r for r in caplog.records if r.getMessage() == "dev_mode"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "no authentication" in warnings[0].__dict__["detail"]


def test_build_authenticator_refuses_without_dev() -> None:
    with pytest.raises(ConfigError) as info:
        build_authenticator(Settings(dev=False))
    message = str(info.value)
    assert "no authentication is configured" in message
    assert "TIDINGS_JWT_SECRET" in message
    assert "TIDINGS_DEV=1" in message
    assert "--dev" in message


def test_a_secret_wins_over_dev_mode_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    authenticator = build_authenticator(Settings(jwt_secret=SECRET, dev=True))
    assert isinstance(authenticator, JWTAuthenticator)
    events = [r.getMessage() for r in caplog.records]
    assert events.count("dev_mode_ignored") == 1
    assert "dev_mode" not in events
    (record,) = [r for r in caplog.records if r.getMessage() == "dev_mode_ignored"]
    assert record.levelno == logging.WARNING
    # Dev mode really is off: a connection without a token is refused.
    with pytest.raises(AuthFailed):
        authenticator.authenticate(connection())


def test_a_secret_without_dev_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(build_authenticator(Settings(jwt_secret=SECRET)), JWTAuthenticator)
    assert not [r for r in caplog.records if r.getMessage().startswith("dev_mode")]


def test_a_public_key_wins_over_dev_mode(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(rsa_key))
    authenticator = build_authenticator(Settings(jwt_public_key_file=str(path), dev=True))
    assert isinstance(authenticator, JWTAuthenticator)
    assert [r.getMessage() for r in caplog.records].count("dev_mode_ignored") == 1


@pytest.mark.parametrize("secret", ["", "short", "s" * 31, "é" * 15])
def test_a_secret_shorter_than_32_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_authenticator(Settings(jwt_secret=secret))
    assert "TIDINGS_JWT_SECRET" in str(info.value)
    assert "32 bytes" in str(info.value)
    assert secret not in str(info.value) or secret == ""


def test_minting_needs_a_secret(rsa_authenticator: JWTAuthenticator) -> None:
    with pytest.raises(ConfigError, match="TIDINGS_JWT_SECRET"):
        rsa_authenticator.mint("alice@example.com", 60)


@pytest.mark.parametrize("secret", ["s" * 32, "é" * 16])
def test_a_secret_of_32_bytes_is_enough(secret: str) -> None:
    authenticator = build_authenticator(Settings(jwt_secret=secret))
    assert isinstance(authenticator, JWTAuthenticator)
    assert authenticator.verify(hs256(secret))["email"] == "alice@example.com"


def test_the_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    authenticator = build_authenticator(Settings())
    assert isinstance(authenticator, JWTAuthenticator)
    assert authenticator.authenticate(bearer(hs256())).email == "alice@example.com"


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the JWT verification keys"):
        build_authenticator(Settings(jwt_public_key_file=str(tmp_path / "absent.pem")))
    with pytest.raises(ConfigError, match="cannot load the JWT verification keys"):
        build_authenticator(Settings(jwt_jwks_file=str(tmp_path / "absent.json")))


def test_a_directory_as_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_authenticator(Settings(jwt_public_key_file=str(tmp_path)))


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"\xff\xfe\x00garbage",
        b"",
    ],
)
def test_a_garbage_public_key_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        build_authenticator(Settings(jwt_public_key_file=str(path)))


def test_a_private_key_as_public_key_file_is_a_config_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "private.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError):
        build_authenticator(Settings(jwt_public_key_file=str(path)))


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"\xff\xfe garbage",
        b"{}",
        b'{"keys": []}',
        b'{"keys": [{"kty": "nonsense"}]}',
        b'{"keys": [1]}',
    ],
)
def test_a_garbage_jwks_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        build_authenticator(Settings(jwt_jwks_file=str(path)))


@pytest.mark.parametrize("content", [b"[]", b"null", b"42"])
def test_a_jwks_file_that_is_not_an_object_is_a_config_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        build_authenticator(Settings(jwt_jwks_file=str(path)))


# --- HS256 ------------------------------------------------------------------------------


def test_an_hs256_token_is_verified() -> None:
    token = hs256(sub="someone")
    verified = hs_authenticator().verify(token)
    assert verified["email"] == "alice@example.com"
    assert verified["sub"] == "someone"


def test_an_hs256_token_signed_with_another_secret_is_refused() -> None:
    assert "invalid token" in refusal(hs_authenticator(), bearer(hs256(OTHER_SECRET)))


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = hs256().split(".")
    payload = b64(json.dumps(claims(email="mallory@example.com")).encode())
    with pytest.raises(AuthFailed):
        hs_authenticator().verify(f"{header}.{payload}.{signature}")


def test_an_expired_token_is_refused() -> None:
    now = int(time.time())
    token = hs256(iat=now - 3600, exp=now - LEEWAY - 60)
    assert "expired" in refusal(hs_authenticator(), bearer(token)).lower()


def test_a_token_expired_within_the_leeway_is_accepted() -> None:
    now = int(time.time())
    token = hs256(iat=now - 3600, exp=now - 2)
    assert hs_authenticator().authenticate(bearer(token)).email == "alice@example.com"


def test_a_token_without_exp_is_refused() -> None:
    token = hs256(exp=None)
    assert "exp" in refusal(hs_authenticator(), bearer(token))


def test_a_token_with_a_non_numeric_exp_is_refused() -> None:
    token = forged({"alg": "HS256", "typ": "JWT"}, claims(exp="later"), SECRET.encode())
    with pytest.raises(AuthFailed):
        hs_authenticator().verify(token)


def test_a_token_not_yet_valid_is_refused() -> None:
    token = hs256(nbf=int(time.time()) + 3600)
    with pytest.raises(AuthFailed):
        hs_authenticator().verify(token)


def test_the_configured_issuer_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    monkeypatch.setenv("TIDINGS_JWT_ISSUER", "https://issuer.example")
    authenticator = build_authenticator(Settings())
    assert isinstance(authenticator, JWTAuthenticator)
    assert authenticator.verify(hs256(iss="https://issuer.example"))["iss"] == (
        "https://issuer.example"
    )
    with pytest.raises(AuthFailed, match=r"issuer|iss"):
        authenticator.verify(hs256(iss="https://evil.example"))
    with pytest.raises(AuthFailed, match="iss"):
        authenticator.verify(hs256())


def test_the_configured_audience_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", SECRET)
    monkeypatch.setenv("TIDINGS_JWT_AUDIENCE", "tidings")
    authenticator = build_authenticator(Settings())
    assert isinstance(authenticator, JWTAuthenticator)
    assert authenticator.verify(hs256(aud="tidings"))["aud"] == "tidings"
    assert authenticator.verify(hs256(aud=["other", "tidings"]))["email"] == "alice@example.com"
    with pytest.raises(AuthFailed, match=r"(?i)aud"):
        authenticator.verify(hs256(aud="another-service"))
    with pytest.raises(AuthFailed, match=r"(?i)aud"):
        authenticator.verify(hs256())


def test_an_audience_is_accepted_when_none_is_configured() -> None:
    assert hs_authenticator().verify(hs256(aud="some-other-service"))["aud"] == (
        "some-other-service"
    )


def test_an_issuer_is_accepted_when_none_is_configured() -> None:
    assert hs_authenticator().verify(hs256(iss="anyone"))["iss"] == "anyone"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = forged({"alg": alg, "typ": "JWT"}, claims())
    message = refusal(hs_authenticator(), bearer(token))
    assert "not accepted" in message


def test_alg_none_is_refused_with_public_keys_too(rsa_authenticator: JWTAuthenticator) -> None:
    with pytest.raises(AuthFailed, match="not accepted"):
        rsa_authenticator.verify(forged({"alg": "none"}, claims()))


@pytest.mark.parametrize("alg", ["HS384", "HS512", "PS256", "EdDSA", "RS512"])
def test_other_algorithms_are_refused(alg: str) -> None:
    token = forged({"alg": alg}, claims(), SECRET.encode())
    with pytest.raises(AuthFailed, match="not accepted"):
        hs_authenticator().verify(token)


def test_a_token_without_alg_is_refused() -> None:
    with pytest.raises(AuthFailed):
        hs_authenticator().verify(forged({"typ": "JWT"}, claims(), SECRET.encode()))


def test_an_hs256_token_is_refused_when_only_a_public_key_is_configured(
    rsa_authenticator: JWTAuthenticator,
) -> None:
    with pytest.raises(AuthFailed, match="'HS256' is not accepted"):
        rsa_authenticator.verify(hs256())


def test_an_rs256_token_is_refused_when_only_a_secret_is_configured(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    with pytest.raises(AuthFailed, match="'RS256' is not accepted"):
        hs_authenticator().verify(token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.!!!.sig",
        b64(b"[]") + "." + b64(b"{}") + ".x",
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(AuthFailed):
        hs_authenticator().verify(token)


# --- RS256 / ES256 ----------------------------------------------------------------------


def test_an_rs256_token_is_verified_with_the_public_key_file(
    rsa_authenticator: JWTAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(email="Carol@Example.com"), rsa_key, algorithm="RS256")
    principal = rsa_authenticator.authenticate(bearer(token))
    assert (principal.email, principal.subprotocol) == ("carol@example.com", None)


def test_an_rs256_token_signed_by_another_key_is_refused(
    rsa_authenticator: JWTAuthenticator,
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), stranger, algorithm="RS256")
    with pytest.raises(AuthFailed, match="invalid token"):
        rsa_authenticator.verify(token)


def test_an_expired_rs256_token_is_refused(
    rsa_authenticator: JWTAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    now = int(time.time())
    token = jwt.encode(claims(exp=now - LEEWAY - 60), rsa_key, algorithm="RS256")
    with pytest.raises(AuthFailed, match="xpired"):
        rsa_authenticator.verify(token)


def test_an_es256_token_is_verified_with_the_jwks_kid(
    jwks_authenticator: JWTAuthenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert jwks_authenticator.authenticate(bearer(token)).email == "alice@example.com"


def test_an_unknown_kid_is_refused(
    jwks_authenticator: JWTAuthenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-2"})
    message = refusal(jwks_authenticator, bearer(token))
    assert "no key for kid 'ec-2'" in message


def test_a_token_without_kid_is_refused_when_only_a_jwks_is_configured(
    jwks_authenticator: JWTAuthenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    with pytest.raises(AuthFailed, match="no key for kid None"):
        jwks_authenticator.verify(token)


def test_an_es256_token_from_another_key_with_a_known_kid_is_refused(
    jwks_authenticator: JWTAuthenticator,
) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(AuthFailed, match="invalid token"):
        jwks_authenticator.verify(token)


def test_a_non_string_kid_is_refused(jwks_authenticator: JWTAuthenticator) -> None:
    token = forged({"alg": "ES256", "kid": ["ec-1"]}, claims(), b"x")
    with pytest.raises(AuthFailed):
        jwks_authenticator.verify(token)


def test_a_jwks_with_several_keys_picks_the_one_named_by_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("rsa-1", rsa_key), ("ec-1", ec_key)))
    authenticator = build_authenticator(Settings(jwt_jwks_file=str(path)))
    assert isinstance(authenticator, JWTAuthenticator)
    rs = jwt.encode(
        claims(email="r@example.com"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    es = jwt.encode(
        claims(email="e@example.com"), ec_key, algorithm="ES256", headers={"kid": "ec-1"}
    )
    assert authenticator.verify(rs)["email"] == "r@example.com"
    assert authenticator.verify(es)["email"] == "e@example.com"


def test_secret_and_public_key_together_accept_both(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(rsa_key))
    authenticator = build_authenticator(Settings(jwt_secret=SECRET, jwt_public_key_file=str(path)))
    assert isinstance(authenticator, JWTAuthenticator)
    assert authenticator.verify(hs256())["email"] == "alice@example.com"
    assert authenticator.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))["email"] == (
        "alice@example.com"
    )


def test_algorithm_confusion_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_authenticator: JWTAuthenticator
) -> None:
    """An HS256 token whose HMAC secret is the server's public key PEM text."""
    pem = public_pem(rsa_key)
    token = forged({"alg": "HS256", "typ": "JWT"}, claims(email="mallory@example.com"), pem)
    with pytest.raises(AuthFailed):
        rsa_authenticator.authenticate(bearer(token))
    # Also when a (different) HS256 secret is configured next to the public key.
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    both = build_authenticator(Settings(jwt_secret=SECRET, jwt_public_key_file=str(path)))
    assert isinstance(both, JWTAuthenticator)
    with pytest.raises(AuthFailed, match="invalid token"):
        both.authenticate(bearer(token))


def test_an_rs256_token_against_an_ec_key_is_refused(
    jwks_authenticator: JWTAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    with pytest.raises(AuthFailed):
        jwks_authenticator.authenticate(bearer(token))


def test_an_es256_token_against_an_rsa_key_is_refused(
    rsa_authenticator: JWTAuthenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    with pytest.raises(AuthFailed):
        rsa_authenticator.authenticate(bearer(token))


# --- which e-mail a token grants --------------------------------------------------------


def test_the_email_claim_is_preferred_over_sub() -> None:
    token = hs256(email="bob@example.com", sub="carol@example.com")
    assert hs_authenticator().authenticate(bearer(token)).email == "bob@example.com"


def test_sub_is_used_without_an_email_claim() -> None:
    token = hs256(email=None, sub="carol@example.com")
    assert hs_authenticator().authenticate(bearer(token)).email == "carol@example.com"


def test_the_email_is_normalised() -> None:
    token = hs256(email="  Bob@EXAMPLE.Com ")
    principal = hs_authenticator().authenticate(bearer(token))
    assert principal.email == "bob@example.com"
    assert principal.may_identify("bob@example.com")
    assert not principal.may_identify("alice@example.com")


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "not-an-email"},
        {"email": None, "sub": "user-1234"},
        {"email": "a b@example.com"},
        {"email": "a@b\x00.io"},
        {"email": "x" * 250 + "@example.com"},
    ],
)
def test_a_claim_that_is_not_an_email_is_refused(fields: dict[str, Any]) -> None:
    message = refusal(hs_authenticator(), bearer(hs256(**fields)))
    assert "not an e-mail address" in message


@pytest.mark.parametrize(
    "fields", [{"email": None}, {"email": 42}, {"email": None, "sub": None}, {"email": ["a@b.io"]}]
)
def test_a_token_without_a_usable_claim_is_refused(fields: dict[str, Any]) -> None:
    message = refusal(hs_authenticator(), bearer(hs256(**fields)))
    assert "neither an 'email' nor a 'sub'" in message


# --- transports -------------------------------------------------------------------------


def test_the_authorization_header_carries_the_token() -> None:
    principal = hs_authenticator().authenticate(bearer(hs256()))
    assert (principal.email, principal.subprotocol) == ("alice@example.com", None)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    conn = connection({"Authorization": f"{scheme}   {hs256()}  "})
    assert hs_authenticator().authenticate(conn).email == "alice@example.com"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc"])
def test_other_authorization_headers_carry_no_token(value: str) -> None:
    message = refusal(hs_authenticator(), connection({"Authorization": value}))
    assert message.startswith("no token")


def test_the_bearer_subprotocol_carries_the_token_and_is_echoed() -> None:
    offered = f"bearer.{hs256()}"
    principal = hs_authenticator().authenticate(connection(protocols=offered))
    assert (principal.email, principal.subprotocol) == ("alice@example.com", offered)


def test_the_app_subprotocol_is_chosen_when_offered_with_the_token() -> None:
    authenticator = hs_authenticator()
    for protocols in (f"bearer.{hs256()}, tidings.v1", f"tidings.v1,bearer.{hs256()}"):
        principal = authenticator.authenticate(connection(protocols=protocols))
        assert (principal.email, principal.subprotocol) == ("alice@example.com", APP_SUBPROTOCOL)


def test_an_empty_bearer_subprotocol_is_no_token() -> None:
    assert refusal(hs_authenticator(), connection(protocols="bearer., tidings.v1")).startswith(
        "no token"
    )


def test_the_header_token_with_the_app_subprotocol() -> None:
    conn = connection({"Authorization": f"Bearer {hs256()}"}, protocols="tidings.v1")
    assert hs_authenticator().authenticate(conn).subprotocol == APP_SUBPROTOCOL


def test_the_access_token_query_parameter_carries_the_token() -> None:
    principal = hs_authenticator().authenticate(connection(query=f"x=1&access_token={hs256()}"))
    assert (principal.email, principal.subprotocol) == ("alice@example.com", None)


def test_an_empty_access_token_is_no_token() -> None:
    assert refusal(hs_authenticator(), connection(query="access_token=")).startswith("no token")


def test_the_header_comes_before_the_subprotocol_and_the_query() -> None:
    conn = connection(
        {"Authorization": f"Bearer {hs256(email='header@example.com')}"},
        query=f"access_token={hs256(email='query@example.com')}",
        protocols=f"bearer.{hs256(email='proto@example.com')}",
    )
    assert hs_authenticator().authenticate(conn).email == "header@example.com"


def test_the_subprotocol_comes_before_the_query() -> None:
    conn = connection(
        query=f"access_token={hs256(email='query@example.com')}",
        protocols=f"bearer.{hs256(email='proto@example.com')}",
    )
    assert hs_authenticator().authenticate(conn).email == "proto@example.com"


def test_a_bad_header_token_is_not_rescued_by_a_good_query_token() -> None:
    conn = connection({"Authorization": "Bearer garbage"}, query=f"access_token={hs256()}")
    with pytest.raises(AuthFailed, match="invalid token"):
        hs_authenticator().authenticate(conn)


def test_no_token_is_refused() -> None:
    message = refusal(hs_authenticator(), connection(protocols="tidings.v1", query="x=1"))
    assert message == "no token: no Authorization header, bearer subprotocol or access_token"


def test_refusals_never_contain_the_token(
    rsa_authenticator: JWTAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    now = int(time.time())
    tokens = [
        hs256(OTHER_SECRET),
        hs256(exp=now - 3600),
        hs256(exp=None),
        hs256(email="not-an-email"),
        hs256(email=None),
        hs256(iss="https://evil.example"),
        hs256(aud="another"),
        forged({"alg": "none"}, claims()),
        forged({"alg": "HS256"}, claims(), public_pem(rsa_key)),
        "SECRETxTOKENxWITHOUTxDOTS",
        "SECRET.TOKEN.PARTS",
        hs256()[:-5] + "AAAAA",
    ]
    strict = build_authenticator(
        Settings(jwt_secret=SECRET, jwt_issuer="https://issuer.example", jwt_audience="t")
    )
    assert isinstance(strict, JWTAuthenticator)
    for token in tokens:
        for authenticator in (strict, hs_authenticator(), rsa_authenticator):
            for conn in (
                bearer(token),
                connection(protocols=f"bearer.{token}"),
                connection(query=f"access_token={token}"),
            ):
                try:
                    authenticator.authenticate(conn)
                except AuthFailed as exc:
                    message = str(exc)
                else:
                    continue
                assert token not in message
                for part in token.split("."):
                    if len(part) >= 8:
                        assert part not in message
    # At least the strict authenticator refused every one of them.
    for token in tokens:
        with pytest.raises(AuthFailed):
            strict.authenticate(bearer(token))


# --- origins ----------------------------------------------------------------------------

NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://chat.example.com", "chat.example.com"),
        ("https://chat.example.com", "chat.example.com"),
        ("http://chat.example.com:80", "chat.example.com"),
        ("http://chat.example.com", "chat.example.com:80"),
        ("https://chat.example.com:443", "chat.example.com"),
        ("https://chat.example.com", "chat.example.com:443"),
        ("http://localhost:8000", "localhost:8000"),
        ("HTTPS://Chat.Example.COM", "chat.EXAMPLE.com"),
        ("https://chat.example.com/", "chat.example.com"),
        ("  https://chat.example.com  ", " chat.example.com "),
        ("http://[::1]:8000", "[::1]:8000"),
    ],
)
def test_without_configured_origins_the_same_host_is_allowed(origin: str, host: str) -> None:
    assert origin_allowed(origin, host, NONE)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://evil.example.com", "chat.example.com"),
        ("https://chat.example.com.evil.io", "chat.example.com"),
        ("https://evil.io", "evil.io.chat.example.com"),
        ("http://localhost:8001", "localhost:8000"),
        ("http://localhost", "localhost:8000"),
        ("https://chat.example.com:80", "chat.example.com"),
        ("http://chat.example.com:443", "chat.example.com"),
        ("https://chat.example.com", "chat.example.com:80"),
        ("http://chat.example.com:8080", "chat.example.com:80"),
        ("http://user@chat.example.com", "chat.example.com"),
    ],
)
def test_without_configured_origins_a_foreign_origin_is_refused(origin: str, host: str) -> None:
    assert not origin_allowed(origin, host, NONE)


@pytest.mark.parametrize(
    "origin",
    ["null", "file://chat.example.com", "ws://chat.example.com", "chrome-extension://abc", ""],
)
def test_a_non_http_origin_is_refused(origin: str) -> None:
    assert not origin_allowed(origin, "chat.example.com", NONE)


def test_without_a_host_no_origin_is_allowed() -> None:
    assert not origin_allowed("https://chat.example.com", None, NONE)


def test_configured_origins_must_match_exactly() -> None:
    allowed = Settings(allowed_origins="https://app.example.com, http://localhost:3000/").origins
    assert origin_allowed("https://app.example.com", "api.example.com", allowed)
    assert origin_allowed("HTTPS://APP.example.com/", None, allowed)
    assert origin_allowed("http://localhost:3000", "localhost:8000", allowed)
    assert not origin_allowed("http://app.example.com", "api.example.com", allowed)
    assert not origin_allowed("https://app.example.com:443", "api.example.com", allowed)
    assert not origin_allowed("https://evil.app.example.com", "api.example.com", allowed)
    assert not origin_allowed("http://localhost:3001", "localhost:8000", allowed)
    # The same-host rule no longer applies once origins are listed.
    assert not origin_allowed("https://api.example.com", "api.example.com", allowed)


def test_a_star_allows_any_origin() -> None:
    allowed = Settings(allowed_origins="*").origins
    assert allowed == frozenset({"*"})
    for origin in ("https://evil.example", "null", "http://localhost:1"):
        assert origin_allowed(origin, None, allowed)


def test_a_principal_expires_with_its_token_plus_the_leeway() -> None:
    exp = int(time.time()) + 120
    conn = connection(headers={"authorization": f"Bearer {hs256(exp=exp)}"})
    principal = hs_authenticator().authenticate(conn)
    assert principal.expires_at == exp + LEEWAY
