"""An asyncio client for Tidings, on ``websockets``.

::

    async with Client("ws://127.0.0.1:8000/ws", "alice@example.com", token) as client:
        await client.send("bob@example.com", "hi")  # returns once stored
        async for message in client.messages():  # acked when you take the next
            print(message.sender, message.content)

Usage and the choices behind it: docs/client.md.
"""

from tidings.client.backoff import Backoff
from tidings.client.core import Client
from tidings.client.models import (
    AuthRefused,
    ClientClosed,
    ClientError,
    ConnectFailed,
    ConnectionEnded,
    Message,
    MessageFailed,
    SendTimeout,
    StateChange,
)
from tidings.ids import new_id

__all__ = [
    "AuthRefused",
    "Backoff",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectFailed",
    "ConnectionEnded",
    "Message",
    "MessageFailed",
    "SendTimeout",
    "StateChange",
    "new_id",
]
