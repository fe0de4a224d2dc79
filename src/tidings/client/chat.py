"""The terminal clients: ``tidings chat`` (interactive) and ``tidings send`` (for scripts).

Both run on :mod:`tidings.client`. ``cli.py`` only dispatches here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from tidings.client import (
    AuthRefused,
    Client,
    ClientError,
    ConnectFailed,
    Message,
    MessageFailed,
    SendTimeout,
    StateChange,
    new_id,
)

COMMANDS = ("chat", "send")
DEFAULT_URL = "ws://127.0.0.1:8000/ws"
# Exit statuses of both commands; 2 is argparse's for a bad command line.
EXIT_FAILED = 1  # the server refused the message (``failed``)
EXIT_UNREACHABLE = 3  # no connection: unreachable, refused handshake, or ended
EXIT_TIMEOUT = 4  # no ``stored`` in time: the outcome is unknown
MARKS = {
    "stored": "✓ stored",
    "sent": "✓ sent",
    "delivered": "✓✓ delivered",
    "read": "✓✓ read",
}
HELP = """\
Type "bob@example.com: hello" to write to bob; plain lines then go to bob too.
  /to EMAIL   send plain lines to EMAIL
  /help       this help
  /quit       leave (or Ctrl-D)"""


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``chat`` and ``send`` to the ``tidings`` command."""
    chat = commands.add_parser("chat", help="chat in the terminal")
    send = commands.add_parser("send", help="send one message; exit 0 once it is stored")
    for parser in (chat, send):
        parser.add_argument("--email", required=True, help="who you are")
        parser.add_argument("--url", default=DEFAULT_URL, help=f"server ({DEFAULT_URL})")
        parser.add_argument(
            "--token",
            default=os.environ.get("TIDINGS_TOKEN"),
            help="a JWT (TIDINGS_TOKEN); none in dev mode",
        )
    send.add_argument("--to", required=True, help="the recipient's e-mail")
    send.add_argument("--id", help="the message id (made up when absent)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
    send.add_argument("text", help="the message")


def run(args: argparse.Namespace) -> int:
    """Run ``tidings chat`` or ``tidings send``; the exit status."""
    if args.command == "send":
        return asyncio.run(
            send_once(args.url, args.email, args.token, args.to, args.text, args.id, args.timeout)
        )
    return asyncio.run(chat(args.url, args.email, args.token))


def _error(text: str) -> None:
    print(f"tidings: {text}", file=sys.stderr)


async def send_once(
    url: str,
    email: str,
    token: str | None,
    to: str,
    text: str,
    message_id: str | None = None,
    seconds: float = 30.0,
) -> int:
    """Send one message; print its id and return 0 once it is ``stored``."""
    try:
        async with Client(
            url, email, token, send_timeout=seconds, open_timeout=seconds, reconnect_attempts=3
        ) as client:
            sent = await client.send(to, text, message_id)
    except MessageFailed as exc:
        _error(f"not sent: {exc.code}: {exc.reason}")
        return EXIT_FAILED
    except SendTimeout as exc:
        _error(f"{exc}")
        return EXIT_TIMEOUT
    except ClientError as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    print(sent)
    return 0


async def chat(url: str, email: str, token: str | None) -> int:
    """The interactive chat on this terminal, until ``/quit`` or end of input."""
    try:
        async with Client(url, email, token) as client, _stdin_lines() as lines:
            return await Chat(client, sys.stdout).run(lines)
    except (AuthRefused, ConnectFailed) as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE


class Chat:
    """One chat session: what is typed goes out, what arrives is shown and marked read."""

    def __init__(self, client: Client, out: TextIO) -> None:
        self._client = client
        self._out = out
        self._to: str | None = None
        self._numbers: dict[str, int] = {}  # own message ids -> the #n shown for them
        self._ended: ClientError | None = None

    @property
    def _prompt(self) -> str:
        return f"{self._to or ''}> " if self._out.isatty() else ""

    def show(self, line: str) -> None:
        """Print ``line`` above the prompt, then the prompt again."""
        # The terminal keeps what the user is typing in its own line buffer; only
        # the prompt can be redrawn without taking over the terminal.
        clear = "\r\x1b[K" if self._out.isatty() else ""
        self._out.write(f"{clear}{line}\n{self._prompt}")
        self._out.flush()

    async def run(self, lines: asyncio.Queue[str | None]) -> int:
        """Handle typed lines until ``/quit``, end of input, or the connection ending."""
        self._client.on_state(self._on_state)
        self.show(f"tidings chat: {self._client.email} on {self._client.url}\n{HELP}")
        async with asyncio.TaskGroup() as sends:
            receiver = asyncio.create_task(self._receive(lines))
            try:
                while (line := await lines.get()) is not None and self._handle(line, sends):
                    pass
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
        if self._ended is not None:
            return EXIT_UNREACHABLE
        self._out.write("\n")
        return 0

    def _handle(self, line: str, sends: asyncio.TaskGroup) -> bool:
        """Act on one typed line; ``False`` to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/help":
            self.show(HELP)
            return True
        if line.startswith("/to"):
            target = line[3:].strip()
            if "@" not in target:
                self.show("usage: /to EMAIL")
            else:
                self._to = target
                self.show(f"writing to {target}")
            return True
        head, colon, rest = line.partition(":")
        if colon and "@" in head and " " not in head.strip() and rest.strip():
            self._to, text = head.strip(), rest.strip()
        elif self._to is not None:
            text = line
        else:
            self.show('to whom? type "bob@example.com: hello" or /to bob@example.com')
            return True
        message_id = new_id()
        self._numbers[message_id] = len(self._numbers) + 1
        sends.create_task(self._send(self._to, text, message_id))
        return True

    async def _send(self, to: str, text: str, message_id: str) -> None:
        number = self._numbers[message_id]
        try:
            await self._client.send(to, text, message_id)
        except MessageFailed as exc:
            self.show(f"  #{number} ✗ failed: {exc.code}: {exc.reason}")
        except ClientError as exc:
            self.show(f"  #{number} ✗ {exc}")

    def _on_state(self, change: StateChange) -> None:
        number = self._numbers.get(change.id)
        if number is None or change.state not in MARKS:
            return  # another session's message, or received/failed (shown by _send)
        self.show(f"  #{number} {MARKS[change.state]}")

    async def _receive(self, lines: asyncio.Queue[str | None]) -> None:
        try:
            async for message in self._client.messages():
                self.show(_line(message))
                await self._client.read(message)
        except ClientError as exc:
            self._ended = exc
            self.show(f"connection ended: {exc}")
            lines.put_nowait(None)


def _line(message: Message) -> str:
    at = message.sent_at.astimezone().strftime("%H:%M")
    return f"[{at}] {message.sender}: {message.content}"


@contextlib.asynccontextmanager
async def _stdin_lines() -> AsyncIterator[asyncio.Queue[str | None]]:
    """Lines typed on standard input as they come, ``None`` at the end, without blocking
    the event loop; the reader is removed when the context ends."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    pending = bytearray()

    def readable() -> None:
        chunk = os.read(fd, 4096)
        if not chunk:
            if pending:
                queue.put_nowait(pending.decode(errors="replace"))
            queue.put_nowait(None)
            loop.remove_reader(fd)
            return
        pending.extend(chunk)
        *complete, rest = pending.split(b"\n")
        pending[:] = rest
        for line in complete:
            queue.put_nowait(line.decode(errors="replace"))

    remove: Callable[[], object]
    try:
        loop.add_reader(fd, readable)
        remove = lambda: loop.remove_reader(fd)  # noqa: E731
    except PermissionError:
        # A regular file cannot be polled; it never blocks for long either.
        for line in sys.stdin:
            queue.put_nowait(line.rstrip("\n"))
        queue.put_nowait(None)
        remove = lambda: None  # noqa: E731
    try:
        yield queue
    finally:
        remove()
