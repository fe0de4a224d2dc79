"""How the MongoDB engine lays messages out in documents, and reads them back.

Each user owns one collection (``collection_for``). A message lives in its
recipient's collection as an *inbox* document (the durable copy, with content)
and in its sender's collection as a *receipt* that mirrors its state.
The receipt is what lets a change stream on the sender's own collection carry
state changes back to the sender, in both change-stream scopes.

Schema version 2 (field ``v``) gives every inbox document a ``seq``: its
position in the inbox, handed out in the order documents are committed (see
``batch.SequencedCommit``). Version 1 documents, written by Tidings 0.1, have
no ``seq``; ``schema.prepare`` numbers them the first time a process opens their
collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel

from tidings.engine.mongo.compat import as_datetime, typed
from tidings.models import (
    Draft,
    FeedEvent,
    Message,
    Position,
    Resync,
    StateChanged,
    Stored,
)
from tidings.states import MessageState

Document = dict[str, Any]

SCHEMA = 2
# The kinds of message document (``k``): a message in its recipient's inbox,
# and the sender's receipt of it. The stored values are those of schema 1.
INBOX = "in"
RECEIPT = "out"

# Ids are unique per sender; this also finds a message by id for ack/read.
SENDER_ID_INDEX = IndexModel(
    [("k", ASCENDING), ("mid", ASCENDING), ("from", ASCENDING)], unique=True, name="sender_id"
)
# One position, one document: a second process that takes the same ``seq``
# is refused, which is what keeps positions in commit order (batch.py).
# Sparse, because receipts have no position.
POSITION_INDEX = IndexModel([("seq", ASCENDING)], unique=True, sparse=True, name="position")
# The backlog: undelivered inbox documents in stored order.
BACKLOG_INDEX = IndexModel(
    [("k", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)], name="stored_order"
)
# Receipts by when their state last moved: what a feed that lost its place
# re-reads for the sender (``moved``, set with every state of a receipt, in
# milliseconds since the epoch; see ``moved_at``).
MOVED_INDEX = IndexModel([("k", ASCENDING), ("moved", ASCENDING)], name="receipt_moved")
MESSAGE_INDEXES = [SENDER_ID_INDEX, POSITION_INDEX, BACKLOG_INDEX, MOVED_INDEX]

PENDING_VALUES = [MessageState.STORED.value, MessageState.SENT.value]


def inbox_doc(sender: str, draft: Draft, now: datetime) -> Document:
    """A new inbox document; its ``seq`` is filled in when it is written."""
    return {
        "v": SCHEMA,
        "k": INBOX,
        "mid": draft.id,
        "from": sender,
        "to": draft.recipient,
        "content": draft.content,
        "sent_at": now,
        "state": MessageState.STORED.value,
        "at": {MessageState.STORED.value: now},
    }


def receipt_doc(sender: str, draft: Draft, conn: str, now: datetime) -> Document:
    """A new receipt, ``received`` until its inbox document is written."""
    return {
        "v": SCHEMA,
        "k": RECEIPT,
        "mid": draft.id,
        "from": sender,
        "to": draft.recipient,
        "sent_at": now,
        "state": MessageState.RECEIVED.value,
        "moved": moved_at(now),
        "conn": conn,
    }


def moved_at(moment: datetime) -> int:
    """A receipt's ``moved``: milliseconds since the epoch.

    A number rather than a date, because nx-27017 stores a date written with
    ``$set`` as a string, which its range queries then compare wrongly (see
    ``compat``); a number compares the same on every server.
    """
    return round(moment.timestamp() * 1000)


def message_of(doc: Mapping[str, Any]) -> Message:
    """The message an inbox document holds."""
    return Message(
        position=Position(doc["seq"]),
        id=doc["mid"],
        sender=doc["from"],
        recipient=doc["to"],
        content=doc["content"],
        sent_at=as_datetime(doc["sent_at"]),
        state=MessageState(doc["state"]),
    )


def state_of(doc: Mapping[str, Any]) -> tuple[MessageState, datetime]:
    """A document's state, and when it reached it (inbox or receipt alike)."""
    state = MessageState(doc["state"])
    return state, as_datetime(doc.get("at", {}).get(state.value, doc["sent_at"]))


def event_of(change: Mapping[str, Any]) -> FeedEvent | None:
    """A change-stream event as a feed event; ``None`` for writes nobody needs to hear of.

    A new inbox document is a message for its recipient; a receipt's state
    change is a ``state`` frame for its sender; everything else is ignored.
    """
    operation = change.get("operationType")
    doc = change.get("fullDocument")
    if operation not in ("insert", "update", "replace") or doc is None:
        return None  # An update whose document is gone by lookup time has no one to tell.
    doc = typed(doc)
    kind = doc.get("k")
    if kind == INBOX and operation == "insert":
        if "seq" not in doc:
            # Written by a Tidings 0.1 process: it has no position to be ordered
            # by, so its recipient re-reads the backlog, which holds it.
            return Resync("a message without a position (schema 1)", doc["to"])
        return Stored(message_of(doc))
    if kind != RECEIPT or operation == "insert":
        return None
    # updateLookup may return a later version; the state this write set is in
    # updatedFields (nx-27017 sends none: its fullDocument is this write's).
    updated = (change.get("updateDescription") or {}).get("updatedFields") or {}
    if "state" in updated:
        doc = {**doc, "state": updated["state"]}
    state, at = state_of(doc)
    origin = doc.get("conn") if state is MessageState.STORED else None
    return StateChanged(doc["from"], doc["mid"], state, at, origin)
