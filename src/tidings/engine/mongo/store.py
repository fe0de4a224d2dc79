"""``MongoStore``: the messages, on PyMongo's async API.

See ``documents`` for the layout, and ``schema`` for the migration from Tidings
0.1's, done the first time a process opens a collection. Every method maps the
driver's errors to ``StoreUnavailable`` (``guarded``): past the storage seam
nobody sees a PyMongo type. Writes are batched: one command per collection for
a sender's consecutive messages, for the inbox inserts of concurrent senders
(``batch.SequencedCommit``) and for the state transitions of many messages.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from tidings.engine.mongo.batch import DUPLICATE_KEY, SequencedCommit
from tidings.engine.mongo.documents import (
    INBOX,
    PENDING_VALUES,
    RECEIPT,
    Document,
    inbox_doc,
    message_of,
    moved_at,
    receipt_doc,
    state_of,
)
from tidings.engine.mongo.errors import guarded
from tidings.engine.mongo.retention import DONE, reclaim
from tidings.engine.mongo.schema import number_schema_1, prepare
from tidings.engine.mongo.users import Users
from tidings.errors import StoreUnavailable
from tidings.models import (
    Draft,
    Message,
    Outcome,
    Position,
    StateChanged,
    Transition,
    User,
    collection_for,
    utcnow,
)
from tidings.states import FINISHED, MessageState, earlier_than


class MongoStore:
    """``Store`` on a MongoDB database (``AsyncMongoClient``; mongomock-motor in tests).

    ``retention``: seconds a delivered or read message is kept (``retention``);
    ``None`` keeps them all. ``clock`` stamps every write.
    """

    def __init__(
        self,
        db: AsyncDatabase[Document],
        retention: float | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._retention = retention
        self._clock = clock
        self._users = Users(db["users"])
        self._prepared: dict[str, asyncio.Future[None]] = {}
        self._inserts = SequencedCommit()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        """Stop the group-commit writers; inserts still waiting fail."""
        await self._inserts.close()

    @guarded
    async def ping(self) -> None:
        await self._db.command("ping")

    @guarded
    async def ensure_user(self, email: str) -> User:
        user = await self._users.ensure(email)
        await self._messages(email)
        return user

    @guarded
    async def find_user(self, email: str) -> User | None:
        return await self._users.find(email)

    @guarded
    async def send(self, sender: str, conn: str, drafts: Sequence[Draft]) -> list[Outcome]:
        if not drafts:
            return []
        now = self._clock()
        outcomes: dict[int, Outcome] = {}
        # The receipts go first: their unique key is what makes an id name one
        # message per sender, and every later transition finds them.
        receipts = await self._messages(sender)
        new_receipts = [receipt_doc(sender, draft, conn, now) for draft in drafts]
        taken = await _insert_unordered(receipts, new_receipts)
        if taken:
            await self._answer_reuse(receipts, sender, drafts, taken, outcomes)
        pending = [i for i in range(len(drafts)) if i not in outcomes]
        docs = {i: inbox_doc(sender, drafts[i], now) for i in pending}
        futures = {}
        for i in pending:  # Submitted in order, so written in order.
            inbox = await self._messages(drafts[i].recipient)
            futures[i] = self._inserts.submit(inbox, docs[i])
        results = await asyncio.gather(*futures.values(), return_exceptions=True)
        stored: list[Message] = []
        for i, result in zip(futures, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if result:
                message = message_of(docs[i])
                stored.append(message)
                outcomes[i] = Outcome(drafts[i].id, MessageState.STORED, now, message)
            else:
                outcomes[i] = await self._answer_resend(sender, drafts[i])
        if stored:
            updates = [_advance(RECEIPT, m.sender, m.id, MessageState.STORED, now) for m in stored]
            # A taken id whose message was stored anyway: the inbox no longer
            # held it, its retention having run out, and its receipt is next.
            # The id names the new message now, and the receipt follows it.
            reused = {drafts[i].id: new_receipts[i] for i in taken if i in futures}
            updates += [reclaim(doc) for m in stored if (doc := reused.get(m.id))]
            await _bulk(receipts, updates)
        return [outcomes[i] for i in range(len(drafts))]

    async def _answer_reuse(
        self,
        receipts: AsyncCollection[Document],
        sender: str,
        drafts: Sequence[Draft],
        taken: set[int],
        outcomes: dict[int, Outcome],
    ) -> None:
        """Answer the drafts whose id this sender used before for someone else."""
        ids = [drafts[i].id for i in taken]
        cursor = receipts.find({"k": RECEIPT, "from": sender, "mid": {"$in": ids}})
        previous = {doc["mid"]: doc async for doc in cursor}
        for i in taken:
            doc = previous.get(drafts[i].id)
            if doc is None or doc["to"] == drafts[i].recipient:
                continue  # The same message again: the inbox's unique key decides.
            if doc["state"] == MessageState.RECEIVED.value:
                outcomes[i] = Outcome(
                    drafts[i].id,
                    MessageState.FAILED,
                    self._clock(),
                    code="invalid",
                    reason=f"the id {drafts[i].id!r} is already taken by a message to "
                    f"{doc['to']}; use another id",
                )
            else:
                outcomes[i] = Outcome(drafts[i].id, *state_of(doc))

    async def _answer_resend(self, sender: str, draft: Draft) -> Outcome:
        inbox = await self._messages(draft.recipient)
        existing = await inbox.find_one({"k": INBOX, "mid": draft.id, "from": sender})
        if existing is None:
            raise StoreUnavailable("a duplicate key named a document that is not there")
        state, at = state_of(existing)
        # Repairs a receipt left behind by an attempt that stopped half way.
        receipts = await self._messages(sender)
        await _bulk(receipts, [_advance(RECEIPT, sender, draft.id, state, at)])
        return Outcome(draft.id, state, at)

    @guarded
    async def find_inbox(self, owner: str, ids: Sequence[str]) -> list[Message]:
        inbox = await self._messages(owner)
        cursor = inbox.find({"k": INBOX, "mid": {"$in": list(ids)}})
        return [message_of(doc) async for doc in cursor]

    @guarded
    async def backlog(
        self, owner: str, since: Position | None, after: Position | None, limit: int
    ) -> list[Message]:
        query: Document = {"k": INBOX, "state": {"$in": PENDING_VALUES}}
        if since is not None:
            query = {
                "k": INBOX,
                "$or": [{"state": {"$in": PENDING_VALUES}}, {"seq": {"$gt": since}}],
            }
        if after is not None:
            query["seq"] = {"$gt": after}
        inbox = await self._messages(owner)

        async def page() -> list[Document]:
            return await inbox.find(query).sort("seq", ASCENDING).limit(limit).to_list(None)

        docs = await page()
        if any("seq" not in doc for doc in docs):
            # A Tidings 0.1 process still writes here (a rolling upgrade that
            # the docs advise against): give its messages positions, read again.
            await number_schema_1(inbox)
            docs = await page()
        return [message_of(doc) for doc in docs if "seq" in doc]

    @guarded
    async def states_since(self, sender: str, since: datetime) -> list[StateChanged]:
        receipts = await self._messages(sender)
        query = {"k": RECEIPT, "moved": {"$gte": moved_at(since)}, "state": {"$ne": "received"}}
        cursor = receipts.find(query).sort("moved", ASCENDING)
        return [StateChanged(doc["from"], doc["mid"], *state_of(doc)) async for doc in cursor]

    @guarded
    async def record(self, transitions: Sequence[Transition]) -> None:
        now = self._clock()
        inboxes: dict[str, list[Transition]] = defaultdict(list)
        for transition in transitions:
            inboxes[transition.recipient].append(transition)
        # Inboxes first, receipts only for the inboxes written: a state reaches
        # the sender (through the receipt) only once it is durable.
        results = await asyncio.gather(
            *(self._record_inbox(owner, group, now) for owner, group in inboxes.items()),
            return_exceptions=True,
        )
        receipts: dict[str, list[UpdateOne]] = defaultdict(list)
        for group, result in zip(inboxes.values(), results, strict=True):
            if isinstance(result, BaseException):
                continue
            for t in group:
                receipts[t.sender].append(_advance(RECEIPT, t.sender, t.id, t.state, now))
        for sender, updates in receipts.items():
            await _bulk(await self._messages(sender), updates)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _record_inbox(self, owner: str, group: list[Transition], now: Any) -> None:
        updates = [_advance(INBOX, t.sender, t.id, t.state, now) for t in group]
        await _bulk(await self._messages(owner), updates)

    async def _messages(self, email: str) -> AsyncCollection[Document]:
        """``email``'s collection, its indexes made and its schema current (once a process)."""
        name = collection_for(email)
        coll = self._db[name]
        prepared = self._prepared.get(name)
        if prepared is None:
            prepared = self._prepared[name] = asyncio.ensure_future(prepare(coll, self._retention))
            prepared.add_done_callback(functools.partial(self._forget_failure, name))
        await asyncio.shield(prepared)
        return coll

    def _forget_failure(self, name: str, prepared: asyncio.Future[None]) -> None:
        if prepared.cancelled() or prepared.exception() is not None:
            self._prepared.pop(name, None)


async def _insert_unordered(coll: AsyncCollection[Document], docs: list[Document]) -> set[int]:
    """Insert ``docs``; the indexes of those whose unique key was taken."""
    try:
        await coll.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors") or []
        if any(error.get("code") != DUPLICATE_KEY for error in errors) or not errors:
            raise
        return {int(error["index"]) for error in errors}
    return set()


async def _bulk(coll: AsyncCollection[Document], updates: list[UpdateOne]) -> None:
    if updates:
        await coll.bulk_write(updates, ordered=False)


def _advance(kind: str, sender: str, message_id: str, state: MessageState, at: Any) -> UpdateOne:
    """Move an inbox document or a receipt forward to ``state``, never back.

    A receipt may still be ``received`` (its inbox document written, the
    receipt not yet moved); an inbox document never is.
    """
    earlier = earlier_than(state)
    changes = {"state": state.value, f"at.{state.value}": at}
    if state in FINISHED:
        changes[DONE] = at  # the retention index counts from here (retention.py)
    if kind == RECEIPT:
        earlier = [MessageState.RECEIVED.value, *earlier]
        changes["moved"] = moved_at(at)  # for states_since
    return UpdateOne(
        {"k": kind, "mid": message_id, "from": sender, "state": {"$in": earlier}},
        {"$set": changes},
    )
