"""``tidings send`` and ``tidings chat`` as real processes against a real server.

The server runs in the test's event loop (``tests.helpers.serve``); the commands
run as ``python -m tidings.cli``, ``chat`` on a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator

import pytest

from tests.helpers import TIMEOUT, free_port, serve
from tidings.auth import JWTAuthenticator
from tidings.client import Client
from tidings.client.chat import EXIT_FAILED, EXIT_UNREACHABLE, Chat, send_once
from tidings.config import Settings

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def environment(**extra: str) -> dict[str, str]:
    """The commands' environment: the suite's, without any ``TIDINGS_*`` setting."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TIDINGS_")}
    env.update(extra)
    return env


async def tidings(*args: str, **env: str) -> tuple[int, str, str]:
    """Run ``tidings ARGS``; its exit status, standard output and standard error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(**env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    """A dev-mode server on the embedded store."""
    async with serve(settings) as url:
        yield url


async def test_send_exits_0_once_stored_and_1_when_the_message_failed(server: str) -> None:
    code, out, err = await tidings("send", "--url", server, "--email", BOB, "--to", BOB, "me")
    assert (code, err) == (0, "")
    assert len(out.strip()) == 22  # the id it made

    # Independent processes, run side by side: each one's start-up is most of its time.
    stored, failed = await asyncio.gather(
        tidings("send", "--url", server, "--email", ALICE, "--to", BOB, "--id", "s1", "hello"),
        tidings("send", "--url", server, "--email", ALICE, "--to", "nobody@example.com", "x"),
    )
    assert stored == (0, "s1\n", "")
    code, out, err = failed
    assert (code, out) == (EXIT_FAILED, "")
    assert "not_found" in err


async def test_send_exits_non_zero_when_unreachable_or_refused() -> None:
    unreachable = f"ws://127.0.0.1:{free_port()}/ws"
    async with serve(Settings(jwt_secret=SECRET)) as url:
        token = JWTAuthenticator(SECRET, {}, None, None).mint(ALICE, 60)
        (gone, _, gone_err), (forged, _, forged_err), signed = await asyncio.gather(
            tidings("send", "--url", unreachable, "--email", ALICE, "--to", BOB, "x"),
            tidings(
                "send", "--url", url, "--email", ALICE, "--to", ALICE, "x", TIDINGS_TOKEN="forged"
            ),
            tidings("send", "--url", url, "--email", ALICE, "--to", ALICE, "--token", token, "x"),
        )
    assert gone == EXIT_UNREACHABLE
    assert "cannot connect" in gone_err
    assert forged == EXIT_UNREACHABLE
    assert "403" in forged_err
    assert (signed[0], signed[2]) == (0, "")


class Terminal:
    """A ``tidings chat`` process on a pseudo-terminal: type lines, wait for output."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self._master = master
        self._output = bytearray()
        self._grew = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self._master, 4096)
        except OSError:  # EIO: the process closed its end
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self._master)
        self._output.extend(chunk)
        self._grew.set()

    @property
    def output(self) -> str:
        """Everything it wrote so far (and the terminal's echo of what was typed)."""
        return self._output.decode(errors="replace")

    def type(self, line: str) -> None:
        """Type ``line`` and Enter."""
        os.write(self._master, f"{line}\n".encode())

    async def expect(self, text: str) -> None:
        """Until ``text`` appeared in the output."""
        try:
            async with asyncio.timeout(TIMEOUT):
                while text not in self.output:
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            raise AssertionError(f"{text!r} never appeared in:\n{self.output}") from None

    async def exit_code(self) -> int:
        """Its exit status, once it has exited."""
        return await asyncio.wait_for(self.process.wait(), TIMEOUT)

    def close(self) -> None:
        """Stop reading its terminal and close it."""
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)


@contextlib.asynccontextmanager
async def chat(url: str, email: str) -> AsyncIterator[Terminal]:
    """``tidings chat --email EMAIL --url URL`` on a fresh pseudo-terminal."""
    master, slave = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.cli",
            "chat",
            "--email",
            email,
            "--url",
            url,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=environment(TERM="dumb"),
            start_new_session=True,
        )
    finally:
        os.close(slave)
    terminal = Terminal(process, master)
    try:
        yield terminal
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        terminal.close()


async def test_two_chats_talk_through_a_real_server(server: str) -> None:
    async with chat(server, BOB) as bob:
        await bob.expect(f"tidings chat: {BOB}")
        async with chat(server, ALICE) as alice:
            await alice.expect("/quit")  # the help, once identified
            alice.type(f"{BOB}: hello bob")
            await bob.expect(f"{ALICE}: hello bob")
            await alice.expect("#1 ✓ stored")
            await alice.expect("#1 ✓✓ read")  # bob's chat marks what it shows read

            bob.type(f"/to {ALICE}")
            await bob.expect(f"writing to {ALICE}")
            bob.type("hi alice")
            await alice.expect(f"{BOB}: hi alice")
            await bob.expect("#1 ✓✓ read")

            alice.type("/quit")
            assert await alice.exit_code() == 0
        bob.type("/quit")
        assert await bob.exit_code() == 0


async def test_the_chat_session_in_process(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The same code as the processes above, where coverage can see it."""
    assert await send_once(server, BOB, None, BOB, "me", "b0") == 0
    assert await send_once(server, ALICE, None, "nobody@example.com", "x") == EXIT_FAILED
    assert capsys.readouterr().out == "b0\n"

    out = io.StringIO()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    for line in ["", "hello?", "/to nobody", "/help", f"{BOB}: hi bob", "again", "/quit"]:
        lines.put_nowait(line)
    async with Client(server, ALICE) as alice:
        assert await Chat(alice, out).run(lines) == 0  # after both sends were stored
    shown = out.getvalue()
    for text in ["to whom?", "usage: /to EMAIL", "#1 ✓ stored", "#2 ✓ stored"]:
        assert text in shown
    assert shown.count("leave (or Ctrl-D)") == 2  # the help at the start, and on /help
