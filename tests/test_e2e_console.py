"""The web console in a real headless Chromium against a real server.

Debian's ``chromium`` package, driven by Playwright with ``executable_path``:
Playwright's own browser downloads are not used (``make test`` installs the
Debian package where it can, as root through apt-get). Without the executable
these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.helpers import TIMEOUT, serve
from tidings.auth import JWTAuthenticator
from tidings.config import Settings
from tidings.console import CONTENT_SECURITY_POLICY

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("TIDINGS_TEST_CHROMIUM", "/usr/bin/chromium"))
# As this machine runs Chromium: without the background-networking flags it keeps
# trying to reach Google's hosts, which a closed network refuses. Playwright gives
# every launch a fresh, empty profile directory of its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Set it (to anything) to copy the screenshot to docs/console.png, for the README.
SCREENSHOT_ENV = "TIDINGS_TEST_SCREENSHOT"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"
# Where every run leaves its screenshot, for CI to collect (build/ is not tracked).
ARTEFACT = Path(__file__).resolve().parent.parent / "build" / "test-artefacts" / "console.png"
SECRET = "console-tests-secret-0123456789abcdef"
ALICE = "alice@example.com"
BOB = "bob@example.com"
HOSTILE = "<img src=x onerror=alert(1)> & <b>bold?</b>"
# Playwright's waits are in milliseconds; a wait, never an assertion about time.
WAIT_MS = TIMEOUT * 1000


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium executable; skips when it is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium package "
            "(make test does, as root through apt-get)"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """That Chromium, headless, launched by Playwright (whose own browsers are not used)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, timeout=WAIT_MS * 3
        )
        try:
            yield launched
        finally:
            await launched.close()


Opener = Callable[[], Awaitable[Page]]


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[Opener]:
    """Pages in contexts of their own: each user has their own localStorage.

    Every page fails its test on a script error or a CSP violation report.
    """
    contexts: list[BrowserContext] = []
    problems: list[str] = []

    async def opener() -> Page:
        context = await browser.new_context(viewport={"width": 760, "height": 720})
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}")
                if "Content Security Policy" in message.text
                else None
            ),
        )
        return page

    yield opener
    for context in contexts:
        await context.close()
    assert not problems, problems


def http_base(ws_url: str) -> str:
    """``http://host:port/`` of the server whose endpoint is ``ws_url``."""
    return ws_url.replace("ws://", "http://", 1).removesuffix("ws")


async def connect(page: Page, email: str, token: str = "") -> None:
    """Fill the connect form and wait until the page says it is identified."""
    await page.fill("#email", email)
    await page.fill("#token", token)
    await page.click("#connect")
    await expect(page.locator("#status")).to_have_text(f"connected as {email}")


async def send(page: Page, to: str, content: str) -> None:
    """Send ``content`` to ``to`` through the page's form."""
    await page.fill("#to", to)
    await page.fill("#content", content)
    await page.click("#send")


async def test_two_pages_chat_states_tick_to_read_and_a_reload_resumes(
    new_page: Opener, tmp_path: Path
) -> None:
    async with serve(Settings(dev=True)) as ws_url:
        base = http_base(ws_url)
        alice, bob = await new_page(), await new_page()
        for page in (alice, bob):
            await page.goto(base)
            # Same origin by default, so the server's default Origin check accepts it.
            await expect(page.locator("#url")).to_have_value(ws_url)
        await connect(alice, ALICE)
        await connect(bob, BOB)
        await expect(alice.locator("#user")).to_contain_text(ALICE)

        await alice.fill("#to", BOB)
        await alice.click("#lookup")
        await expect(alice.locator("#recipient")).to_have_text(f"bob <{BOB}> is online")

        # Live, as text: the markup shows literally and no element is made of it.
        await send(alice, BOB, HOSTILE)
        bob_messages = bob.locator('#messages li[data-dir="in"] .content')
        await expect(bob_messages).to_have_text([HOSTILE])
        assert await bob.locator("#messages img, #messages b").count() == 0
        assert await alice.locator("#messages img, #messages b").count() == 0
        # Bob's page acked it on arrival and read it on screen: alice's tick ends at read.
        out = alice.locator('#messages li[data-dir="out"] .state')
        await expect(out).to_have_text(["read"])
        # A reload resumes by itself: e-mail and URL come back from localStorage.
        await bob.reload()
        await expect(bob.locator("#status")).to_have_text(f"connected as {BOB}")
        await expect(bob.locator("#email")).to_have_value(BOB)
        # Away and back: what was sent meanwhile arrives, what was read does not again.
        await bob.goto("about:blank")
        await send(alice, BOB, "while you were away")
        # Stored while bob is away (or "sent" to the socket his leaving page dropped).
        await expect(out.nth(1)).to_have_text(re.compile("stored|sent"))
        await bob.goto(base)
        await expect(bob_messages).to_have_text(["while you were away"])
        # A dropped socket: the page reconnects with backoff and misses nothing.
        status = await bob.evaluate(
            """() => new Promise((resolve) => {
                const ws = conn.ws;
                ws.addEventListener("close", () => resolve($("status").textContent));
                ws.close(4000, "test drop");
            })"""
        )
        assert status.startswith("reconnecting in "), status
        await send(alice, BOB, "across the drop")
        await expect(bob.locator("#status")).to_have_text(f"connected as {BOB}")
        await send(alice, BOB, "after")
        # Each exactly once, in order; "after" is the sentinel that nothing more is due.
        await expect(bob_messages).to_have_text(["while you were away", "across the drop", "after"])
        await expect(out).to_have_text(["read", "read", "read", "read"])

        # And back: alice's page shows bob's reply beside her own messages.
        await send(bob, ALICE, "Got them all, once each.")
        await expect(alice.locator('#messages li[data-dir="in"] .content')).to_have_text(
            ["Got them all, once each."]
        )
        await expect(bob.locator('#messages li[data-dir="out"] .state')).to_have_text(["read"])
        screenshot = tmp_path / "console.png"
        await alice.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 0
        ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, ARTEFACT)
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(screenshot, DOCS_SCREENSHOT)


async def test_with_authentication_on_the_page_asks_for_a_token(new_page: Opener) -> None:
    minter = JWTAuthenticator(SECRET, {}, None, None)
    async with serve(Settings(jwt_secret=SECRET)) as ws_url:
        page = await new_page()
        response = await page.goto(http_base(ws_url))
        assert response is not None
        assert response.ok
        # No token: the handshake is refused (403) and the page says what it needs.
        await page.fill("#email", ALICE)
        await page.click("#connect")
        await expect(page.locator("#status")).to_have_text("refused by the server")
        await expect(page.locator("#token-hint")).to_contain_text("paste a token")
        # A token for someone else is refused at #email.
        await page.fill("#token", minter.mint("mallory@example.com", 60))
        await page.click("#connect")
        await expect(page.locator("#token-hint")).to_have_text(
            "This token is for another e-mail address."
        )
        await expect(page.locator("#status")).to_contain_text("closed")
        # The right token goes in the bearer. subprotocol, next to tidings.v1.
        await connect(page, ALICE, minter.mint(ALICE, 60))
        await expect(page.locator("#token-hint")).to_be_hidden()


async def test_the_policy_is_served_and_enforced_and_the_own_origin_connects(
    browser: Browser,
) -> None:
    # Not new_page: this test makes a violation on purpose.
    async with serve(Settings(dev=True)) as ws_url, await browser.new_context() as context:
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        response = await page.goto(http_base(ws_url))
        assert response is not None
        headers = await response.all_headers()
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
        # connect-src 'self' covers ws:// to the same host, and the default Origin
        # check takes the page's own origin: the socket opens and identifies.
        await connect(page, ALICE)
        # The policy is enforced, not only sent: an inline handler in injected
        # markup does not run, and Chromium reports the violation.
        violations = await page.evaluate(
            """() => new Promise((resolve) => {
                const seen = [];
                document.addEventListener("securitypolicyviolation", (event) => {
                    seen.push(event.effectiveDirective);
                    resolve(seen);
                });
                const holder = document.createElement("div");
                holder.setAttribute("onclick", "window.pwned = true");
                document.body.append(holder);
                holder.click();
            })"""
        )
        assert violations == ["script-src-attr"]
        assert await page.evaluate("window.pwned") is None
