"""Authentication: who a connection is allowed to identify as.

A client token is a JWT whose ``email`` claim (or, lacking one, ``sub``) is the
e-mail it may identify as. It comes in the ``Authorization: Bearer`` header, as
a ``bearer.<token>`` WebSocket subprotocol (browsers cannot set headers), or as
an ``access_token`` query parameter.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.requests import HTTPConnection

from tidings.config import Settings
from tidings.emails import normalise_email
from tidings.errors import AuthFailed, ConfigError

log = logging.getLogger("tidings.auth")

SUBPROTOCOL_PREFIX = "bearer."
# A browser must be answered with one of the subprotocols it offered. This
# one is chosen when offered, so that the token need not be echoed back.
APP_SUBPROTOCOL = "tidings.v1"
ASYMMETRIC = ["RS256", "ES256"]
# RFC 7518 asks for an HS256 key at least as long as the hash output.
MIN_SECRET_BYTES = 32
# Tolerated clock skew between the token issuer and this server, in seconds.
LEEWAY = 10


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated connection. ``email`` is ``None`` only in dev mode: anyone."""

    email: str | None
    subprotocol: str | None = None
    # When the credentials expire (seconds since the epoch); the connection ends then.
    expires_at: float | None = None

    def may_identify(self, email: str) -> bool:
        """True when this connection may identify as ``email`` (already normalised)."""
        return self.email is None or self.email == email


class Authenticator(Protocol):
    """Decides, before a WebSocket is accepted, who is on the other end."""

    def authenticate(self, conn: HTTPConnection) -> Principal:
        """The principal of ``conn``; raise ``AuthFailed`` to refuse it."""


class DevAuthenticator:
    """Dev mode: no credentials, and a connection may identify as anyone."""

    def authenticate(self, conn: HTTPConnection) -> Principal:
        return Principal(email=None, subprotocol=_app_subprotocol(conn))


class JWTAuthenticator:
    """Verifies client tokens with PyJWT: signature, expiry, and ``iss``/``aud`` if set."""

    def __init__(
        self,
        secret: str | None,
        public_keys: dict[str | None, Any],
        issuer: str | None,
        audience: str | None,
    ) -> None:
        self._secret = secret
        # Keyed by ``kid``; ``None`` is the key for tokens that name none.
        self._public_keys = public_keys
        self._issuer = issuer
        self._audience = audience

    def authenticate(self, conn: HTTPConnection) -> Principal:
        token, subprotocol = _token(conn)
        claims = self.verify(token)
        claimed = claims.get("email") or claims.get("sub")
        if not isinstance(claimed, str):
            raise AuthFailed("the token has neither an 'email' nor a 'sub' claim")
        try:
            email = normalise_email(claimed)
        except ValueError:
            raise AuthFailed("the token's e-mail claim is not an e-mail address") from None
        return Principal(
            email=email,
            subprotocol=_app_subprotocol(conn) or subprotocol,
            expires_at=float(claims["exp"]) + LEEWAY,
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; ``AuthFailed`` with the reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            # The key decides the algorithm, never the token alone: an RS256
            # public key is never used as an HS256 secret.
            if algorithm == "HS256" and self._secret is not None:
                key: Any = self._secret
            elif algorithm in ASYMMETRIC and self._public_keys:
                # A key named by kid, else the PEM key, which has no kid.
                key = self._public_keys.get(header.get("kid")) or self._public_keys.get(None)
                if key is None:
                    raise AuthFailed(f"no key for kid {header.get('kid')!r}")
            else:
                raise AuthFailed(f"algorithm {algorithm!r} is not accepted")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            # PyJWT raises TypeError/ValueError when a key does not suit the
            # token's algorithm (an EC key for an RS256 token, say).
            raise AuthFailed(f"invalid token: {exc}") from None
        return claims

    def mint(self, email: str, ttl: int) -> str:
        """A token for ``email``, signed with the configured secret (``tidings token``)."""
        if self._secret is None or len(self._secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"minting needs a TIDINGS_JWT_SECRET of at least {MIN_SECRET_BYTES} bytes"
            )
        if ttl <= 0:
            raise ConfigError("a token's lifetime must be positive")
        now = int(time.time())
        claims: dict[str, Any] = {"email": email, "sub": email, "iat": now, "exp": now + ttl}
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        return jwt.encode(claims, self._secret, algorithm="HS256")


def origin_allowed(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a browser page from ``origin`` may connect.

    With no allowed origins configured, only the server's own origin may: the
    one whose host is the ``Host`` the browser sent. ``*`` allows any origin.
    """
    normalised = origin.strip().rstrip("/").lower()
    if allowed:
        return "*" in allowed or normalised in allowed
    parts = urlsplit(normalised)
    if parts.scheme not in ("http", "https") or host is None:
        return False
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    return parts.netloc.removesuffix(default) == host.strip().lower().removesuffix(default)


def _token(conn: HTTPConnection) -> tuple[str, str | None]:
    """The token and, when it came as a subprotocol, that subprotocol."""
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), None
    for offered in _offered(conn):
        if offered.startswith(SUBPROTOCOL_PREFIX) and len(offered) > len(SUBPROTOCOL_PREFIX):
            return offered.removeprefix(SUBPROTOCOL_PREFIX), offered
    token = conn.query_params.get("access_token")
    if token:
        return token, None
    raise AuthFailed("no token: no Authorization header, bearer subprotocol or access_token")


def _offered(conn: HTTPConnection) -> list[str]:
    header = conn.headers.get("sec-websocket-protocol", "")
    return [item.strip() for item in header.split(",") if item.strip()]


def _app_subprotocol(conn: HTTPConnection) -> str | None:
    return APP_SUBPROTOCOL if APP_SUBPROTOCOL in _offered(conn) else None


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator the settings ask for; refuse to guess when they ask for none."""
    public_keys = _public_keys(settings)
    if settings.jwt_secret is not None or public_keys:
        if settings.dev:
            log.warning(
                "dev_mode_ignored",
                extra={"detail": "TIDINGS_DEV=1 is ignored: authentication is configured"},
            )
        if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"TIDINGS_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes for HS256"
            )
        return JWTAuthenticator(
            settings.jwt_secret, public_keys, settings.jwt_issuer, settings.jwt_audience
        )
    if settings.dev:
        log.warning(
            "dev_mode",
            extra={"detail": "TIDINGS_DEV=1: no authentication, anyone may identify as anyone"},
        )
        return DevAuthenticator()
    raise ConfigError(
        "no authentication is configured. Set TIDINGS_JWT_SECRET (HS256), "
        "TIDINGS_JWT_PUBLIC_KEY_FILE or TIDINGS_JWT_JWKS_FILE (RS256/ES256); for a local "
        "trial without authentication set TIDINGS_DEV=1 (or pass --dev)."
    )


def _public_keys(settings: Settings) -> dict[str | None, Any]:
    keys: dict[str | None, Any] = {}
    try:
        if settings.jwt_public_key_file:
            pem = Path(settings.jwt_public_key_file).read_bytes()
            keys[None] = load_pem_public_key(pem)
        if settings.jwt_jwks_file:
            for jwk in jwt.PyJWKSet.from_json(Path(settings.jwt_jwks_file).read_text()).keys:
                # A JWK without a kid never displaces the PEM key.
                keys.setdefault(jwk.key_id, jwk.key)
    except (
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        jwt.PyJWKError,
        jwt.PyJWKSetError,
    ) as exc:
        raise ConfigError(f"cannot load the JWT verification keys: {exc}") from exc
    return keys
