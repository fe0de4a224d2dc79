"""The web console: a plain HTML, CSS and JS page at ``/`` that speaks the v1 protocol.

The three files live in ``tidings/static`` and are read through
``importlib.resources``, so they are served the same from a checkout, an
installed wheel or a zip. They are small and fixed, so each is read once, on
its first request, and kept.

Every response here carries a strict Content-Security-Policy: scripts, styles
and connections only from the page's own origin (``connect-src 'self'`` also
covers ``ws:``/``wss:`` to the same host, per CSP Level 3), nothing inline,
no framing. The console renders other users' content with ``textContent``;
the policy is the second line of defence should that ever slip.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the installed version; revalidating costs one request.
    "Cache-Control": "no-cache",
}
# URL path -> (file in tidings/static, media type). Only these are served: no
# directory listing, no path from the request ever reaches the file system.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}


@cache
def static_file(name: str) -> bytes:
    """The bytes of ``tidings/static/<name>``, read once."""
    return files("tidings").joinpath("static", name).read_bytes()


def _route(path: str, name: str, media_type: str) -> Route:
    async def endpoint(request: Request) -> Response:
        return Response(static_file(name), media_type=media_type, headers=SECURITY_HEADERS)

    return Route(path, endpoint, methods=["GET"])


def console_routes() -> list[BaseRoute]:
    """``GET /`` (the console page) and the script and style sheet it loads."""
    return [_route(path, name, media_type) for path, (name, media_type) in FILES.items()]
