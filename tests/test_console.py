"""The web console's files and headers, without a browser (tests/test_e2e_console.py has one)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from tidings.app import create_app
from tidings.config import Settings
from tidings.console import CONTENT_SECURITY_POLICY, FILES, static_file

REPOSITORY = Path(__file__).resolve().parent.parent
STATIC = REPOSITORY / "src" / "tidings" / "static"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The app in process; the console's routes need no lifespan."""
    app = create_app(Settings(dev=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/console.js", "text/javascript; charset=utf-8"),
        ("/console.css", "text/css; charset=utf-8"),
    ],
)
async def test_each_file_is_served_with_its_type_and_the_security_headers(
    http: httpx.AsyncClient, path: str, media_type: str
) -> None:
    response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.content == static_file(FILES[path][0])


def test_the_policy_allows_only_the_own_origin_and_nothing_inline() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[name] == "'self'", name
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert directives["frame-ancestors"] == "'none'"
    assert directives["form-action"] == "'none'"
    assert directives["base-uri"] == "'none'"


async def test_only_the_console_files_are_served(http: httpx.AsyncClient) -> None:
    for path in ("/index.html", "/static/console.js", "/../pyproject.toml", "/console.py"):
        assert (await http.get(path)).status_code == 404, path
    assert (await http.post("/")).status_code == 405


def test_the_page_has_no_inline_script_or_style() -> None:
    # The policy would block them; better that the page never needs them.
    html = static_file("index.html").decode()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ['<script src="console.js" defer>']
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"


def test_the_script_never_builds_html_from_strings() -> None:
    script = static_file("console.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


def test_importlib_resources_finds_every_console_file() -> None:
    # How the installed package reads them: no path relative to the source tree.
    static = files("tidings").joinpath("static")
    for name, _ in FILES.values():
        assert static.joinpath(name).is_file(), name
    assert {name for name, _ in FILES.values()} == {p.name for p in STATIC.iterdir()}


def test_the_build_config_ships_every_console_file() -> None:
    # An installed wheel carries only the package data pyproject names (the
    # Dockerfile's non-editable install in tests/test_deploy.py shows it for real).
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tidings"]
    for path in STATIC.iterdir():
        relative = path.relative_to(STATIC.parent).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
