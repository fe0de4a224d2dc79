"""The store: what sessions and handlers read and write in MongoDB.

Users and presence have modules of their own (``users``, ``presence``); this
one keeps the messages.

Each user owns one collection (``collection_for``). A message lives in its
recipient's collection as an *inbox* document (the durable copy, with content),
and in its sender's collection as an *outbox* receipt that mirrors its state.
The receipt is what lets a change stream on the sender's own collection carry
state changes back to the sender, in both change-stream scopes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from tidings.errors import ClientError, ErrorCode, StoreUnavailable
from tidings.groupcommit import GroupCommit
from tidings.models import (
    INBOX,
    OUTBOX,
    Change,
    Message,
    Outcome,
    User,
    collection_for,
    current_state,
    utcnow,
)
from tidings.presence import Presence
from tidings.protocol import MessageState, earlier_than
from tidings.users import Users

Document = dict[str, Any]

USERS = "users"
PRESENCE = "presence"

# Ids are unique per sender; this also serves ack/read, which look a message up by id.
SENDER_ID_INDEX = IndexModel(
    [("k", ASCENDING), ("mid", ASCENDING), ("from", ASCENDING)], unique=True, name="sender_id"
)
# The backlog: undelivered inbox documents in the order they were stored.
BACKLOG_INDEX = IndexModel(
    [("k", ASCENDING), ("state", ASCENDING), ("_id", ASCENDING)], name="backlog"
)
# nx-27017 accepts an index on ``_id`` but then fails every insert ("JSON path
# error near '_id'"); on it the backlog is sorted without the index's help.
NX_BACKLOG_INDEX = IndexModel([("k", ASCENDING), ("state", ASCENDING)], name="backlog")
PENDING = [MessageState.STORED.value, MessageState.SENT.value]


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Report a database that does not answer as ``StoreUnavailable``, for every caller."""

    @functools.wraps(method)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            raise StoreUnavailable(f"database error: {exc}") from exc

    return guarded


class Store(Protocol):
    """What sessions and handlers need from the database."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers."""

    async def ensure_user(self, email: str) -> User:
        """The user record for ``email``, created on first identification."""

    async def find_user(self, email: str, presence: bool = True) -> User | None:
        """The user record for ``email`` or ``None``; ``online`` only with ``presence``."""

    async def set_presence(self, email: str, online: bool) -> None:
        """Record that this process does or no longer holds a connection of ``email``."""

    async def refresh_presence(self, emails: Sequence[str]) -> None:
        """Keep this process's presence records alive."""

    async def send(
        self, sender: str, recipient: User, message_id: str, content: str, conn: str
    ) -> Outcome:
        """Store a message durably, once per sender and id; a resend changes nothing.

        Raises ``ClientError`` when the id is taken by a message still on its way
        to someone else.
        """

    async def confirm(self, message: Message) -> None:
        """Tell the sender's other connections that ``message`` is stored."""

    async def find_inbox(self, owner: str, message_id: str, sender: str | None) -> list[Message]:
        """``owner``'s received messages with this id, optionally from one sender."""

    async def backlog(
        self, owner: str, since: ObjectId | None, after: ObjectId | None, limit: int
    ) -> list[Message]:
        """The next page of ``owner``'s backlog, oldest first, after ``after``."""

    async def advance(self, message: Message, state: MessageState) -> bool:
        """Move a message forward to ``state``; ``False`` when that is no step forward."""


class MongoStore:
    """``Store`` on any database with PyMongo's async collection API.

    That is ``AsyncMongoClient`` in production and mongomock-motor for the
    embedded store. mongomock has no change streams, so in embedded mode the
    store reports each write to ``on_change`` (the in-process feed) itself:
    the one place where the two differ.
    """

    def __init__(
        self,
        db: AsyncDatabase[Document],
        on_change: Callable[[Change], None] | None = None,
    ) -> None:
        self._db = db
        self._on_change = on_change
        self._users = Users(db[USERS])
        self._presence = Presence(db[PRESENCE])
        self._indexed: set[str] = set()
        self._message_indexes = [SENDER_ID_INDEX, BACKLOG_INDEX]
        self._group = GroupCommit()

    @_guarded
    async def start(self) -> None:
        """Create the indexes of the shared collections."""
        if await self._is_nx_27017():
            self._message_indexes = [SENDER_ID_INDEX, NX_BACKLOG_INDEX]
        await self._presence.start()

    async def close(self) -> None:
        """Stop the group-commit writers; inserts still waiting fail."""
        await self._group.close()

    async def _is_nx_27017(self) -> bool:
        try:
            info = await self._db.command("buildInfo")
        except PyMongoError:
            return False
        return bool(info.get("process") == "nx_27017")

    @_guarded
    async def ping(self) -> None:
        await self._db.command("ping")

    @_guarded
    async def ensure_user(self, email: str) -> User:
        user = await self._users.ensure(email)
        await self._messages(email)
        return user

    @_guarded
    async def find_user(self, email: str, presence: bool = True) -> User | None:
        user = await self._users.find(email)
        if user is None or not presence:
            return user
        return dataclasses.replace(user, online=await self._presence.is_online(email))

    @_guarded
    async def set_presence(self, email: str, online: bool) -> None:
        await self._presence.set(email, online)

    @_guarded
    async def refresh_presence(self, emails: Sequence[str]) -> None:
        await self._presence.refresh(emails)

    @_guarded
    async def send(
        self, sender: str, recipient: User, message_id: str, content: str, conn: str
    ) -> Outcome:
        now = utcnow()
        common = {"mid": message_id, "from": sender, "to": recipient.email, "sent_at": now}
        # The receipt is written first, so that every later transition finds it,
        # and its unique key is what makes an id name one message per sender.
        receipts = await self._messages(sender)
        receipt = {"k": OUTBOX, **common, "state": MessageState.RECEIVED.value, "conn": conn}
        if not await self._insert(receipts, receipt):
            previous = await receipts.find_one({"k": OUTBOX, "mid": message_id, "from": sender})
            assert previous is not None, "a duplicate key implies the document exists"
            if previous["to"] != recipient.email:
                if previous["state"] == MessageState.RECEIVED.value:
                    raise ClientError(
                        ErrorCode.INVALID,
                        f"the id {message_id!r} is already taken by a message to "
                        f"{previous['to']}; use another id",
                        message_id,
                    )
                return _outcome(previous)
            # The same message again: carry on, since an earlier attempt may have
            # stopped half way; the inbox's unique key decides below.
        doc = {
            "_id": ObjectId(),
            "k": INBOX,
            **common,
            "content": content,
            "state": MessageState.STORED.value,
            "at": {MessageState.STORED.value: now},
        }
        inbox = await self._messages(recipient.email)
        if not await self._insert(inbox, doc):
            existing = await inbox.find_one({"k": INBOX, "mid": message_id, "from": sender})
            assert existing is not None, "a duplicate key implies the document exists"
            message = Message.from_doc(existing)
            # Repairs a receipt left behind by an attempt that stopped half way.
            await self._advance_receipt(message, message.state, message.state_at)
            return Outcome(message.id, message.state, message.state_at)
        return Outcome(message_id, MessageState.STORED, now, Message.from_doc(doc))

    @_guarded
    async def confirm(self, message: Message) -> None:
        await self._advance_receipt(message, MessageState.STORED, message.state_at)

    @_guarded
    async def find_inbox(self, owner: str, message_id: str, sender: str | None) -> list[Message]:
        query: Document = {"k": INBOX, "mid": message_id}
        if sender is not None:
            query["from"] = sender
        cursor = (await self._messages(owner)).find(query).sort("_id", DESCENDING).limit(2)
        return [Message.from_doc(doc) for doc in await cursor.to_list(None)]

    @_guarded
    async def backlog(
        self, owner: str, since: ObjectId | None, after: ObjectId | None, limit: int
    ) -> list[Message]:
        query: Document = {"k": INBOX, "state": {"$in": PENDING}}
        if since is not None:
            query = {"k": INBOX, "$or": [{"state": {"$in": PENDING}}, {"_id": {"$gt": since}}]}
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = (await self._messages(owner)).find(query).sort("_id", ASCENDING).limit(limit)
        return [Message.from_doc(doc) for doc in await cursor.to_list(None)]

    @_guarded
    async def advance(self, message: Message, state: MessageState) -> bool:
        now = utcnow()
        inbox = await self._messages(message.recipient)
        updated = await inbox.find_one_and_update(
            {"_id": message.oid, "state": {"$in": earlier_than(state)}},
            {"$set": {"state": state.value, f"at.{state.value}": now}},
            return_document=ReturnDocument.AFTER,
        )
        if updated is None:
            return False
        self._report(Change("update", updated))
        await self._advance_receipt(message, state, now)
        return True

    async def _advance_receipt(self, message: Message, state: MessageState, now: datetime) -> None:
        outbox = await self._messages(message.sender)
        updated = await outbox.find_one_and_update(
            {
                "k": OUTBOX,
                "mid": message.id,
                "from": message.sender,
                "state": {"$in": [MessageState.RECEIVED.value, *earlier_than(state)]},
            },
            {"$set": {"state": state.value, f"at.{state.value}": now}},
            return_document=ReturnDocument.AFTER,
        )
        if updated is not None:
            self._report(Change("update", updated))

    async def _insert(self, coll: AsyncCollection[Document], doc: Document) -> bool:
        """Insert ``doc``; ``False`` when a document with its key is already there."""
        if not await self._group.insert(coll, doc):
            return False
        self._report(Change("insert", dict(doc)))
        return True

    def _report(self, change: Change) -> None:
        if self._on_change is not None:
            self._on_change(change)

    async def _messages(self, email: str) -> AsyncCollection[Document]:
        name = collection_for(email)
        coll = self._db[name]
        if name not in self._indexed:
            await coll.create_indexes(self._message_indexes)
            self._indexed.add(name)
        return coll


def _outcome(receipt: Document) -> Outcome:
    """A resend's answer from the message's receipt: its current state."""
    return Outcome(receipt["mid"], *current_state(receipt))
