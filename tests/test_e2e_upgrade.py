"""End to end: the upgrade from Tidings 0.1 to storage schema 2, on data 0.1 really wrote.

Tidings 0.1 (commit ``f6d435d``, the release) stores an inbox document without
a position: its backlog is read in ObjectId order. Schema 2 gives every inbox
document a ``seq``, and the first time a new process opens a collection it
numbers the schema 1 documents there in ObjectId order (``schema.prepare``).

These tests do not imitate 0.1: they extract its source with ``git archive``,
run it as a ``tidings serve`` process of its own on nx-27017, and let it store
messages and states through the wire protocol. Then, as the documented upgrade
order says (every 0.1 process stopped before the first new one starts), they
stop it and start the code under test on the same database, and check that
nothing a client relies on changed:

- the backlog holds exactly the messages 0.1 left unacknowledged, in 0.1's order;
- ``since`` replays from a message 0.1 stored, and new messages come after the old;
- acks reach the sender, a resend answers the stored state and stores nothing,
  and an id that two senders used still names two messages;
- every inbox document gets an integer ``seq``, and ``v: 2`` marks exactly what
  the new code wrote or numbered.

The second test is the upgrade done wrong (a 0.1 process still running): an
inbox document in 0.1's shape written after the new code prepared the
collection is still delivered, with a position after the existing ones.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from tests.helpers import TIMEOUT, Client, client
from tests.mongo import NxServer
from tests.processes import server_environment, tidings_serve
from tidings.models import collection_for

pytestmark = pytest.mark.e2e

RELEASE_0_1 = "f6d435d"
REPOSITORY = Path(__file__).resolve().parents[1]

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"

# Every field of an inbox document as 0.1 writes it: no ``seq``, no ``v``.
SCHEMA_1_INBOX_FIELDS = {"_id", "k", "mid", "from", "to", "sent_at", "content", "state", "at"}
# What alice and carol send through 0.1, in this order; carol reuses alice's id o4.
OLD_SENDS = [
    (ALICE, "o1"),
    (ALICE, "o2"),
    (ALICE, "o3"),
    (ALICE, "o4"),
    (CAROL, "o4"),
    (ALICE, "o5"),
    (ALICE, "o6"),
]

Document = dict[str, Any]


def content(sender: str, message_id: str) -> str:
    """The content every message of these tests carries: checked on each delivery."""
    return f"{message_id} from {sender.partition('@')[0]}"


def run(*command: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` in the repository's root; its result, whatever its exit status."""
    return subprocess.run(
        command, input=stdin, capture_output=True, cwd=REPOSITORY, timeout=TIMEOUT, check=False
    )


@pytest.fixture
def release_0_1(tmp_path: Path) -> Path:
    """The ``src`` directory of Tidings 0.1, extracted from the repository's history."""
    git, tar = shutil.which("git"), shutil.which("tar")
    if git is None or tar is None:
        pytest.skip("git and tar are needed to extract Tidings 0.1")
    found = run(git, "cat-file", "-e", f"{RELEASE_0_1}^{{commit}}")
    if found.returncode != 0:
        pytest.skip(
            f"commit {RELEASE_0_1} (Tidings 0.1) is not in this clone's history "
            f"(a shallow clone?): {found.stderr.decode().strip()}"
        )
    archive = run(git, "archive", "--format=tar", RELEASE_0_1, "src")
    root = tmp_path / "release-0.1"
    root.mkdir()
    extracted = (
        run(tar, "-x", "-C", str(root), stdin=archive.stdout)
        if archive.returncode == 0
        else archive
    )
    if extracted.returncode != 0:
        pytest.skip(f"could not extract Tidings 0.1: {extracted.stderr.decode().strip()}")
    src = root / "src"
    # 0.1's layout: one store module, no engines.
    assert (src / "tidings" / "store.py").is_file()
    assert not (src / "tidings" / "engine").exists()
    # PYTHONPATH comes before the editable install's path, so 0.1 shadows HEAD.
    imported = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('tidings').origin)"],
        env=server_environment(pythonpath=src),
        cwd=tmp_path,
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert Path(imported.stdout.decode().strip()) == src / "tidings" / "__init__.py"
    return src


async def messages(connection: Client, count: int) -> list[tuple[str, str, str]]:
    """The next ``count`` frames, each a ``message``: (from, id, state)."""
    frames = [await connection.recv() for _ in range(count)]
    assert all(f["type"] == "message" for f in frames), frames
    assert all(f["content"] == content(f["from"], f["id"]) for f in frames), frames
    return [(f["from"], f["id"], f["state"]) for f in frames]


async def state_frame(sender: Client, message_id: str, state: str) -> dict[str, Any]:
    """Skip ``sender``'s frames up to the state ``state`` of ``message_id``; that frame."""
    frames = await sender.recv_until(
        lambda f: f["type"] == "state" and f["id"] == message_id and f["state"] == state
    )
    return frames[-1]


async def send(sender: Client, email: str, message_id: str) -> None:
    """Send a message to bob, who is online, and wait until it is ``sent``."""
    await sender.send_message(BOB, content(email, message_id), id=message_id)
    assert await sender.states(message_id, until="sent") == ["received", "stored", "sent"]


@dataclass
class Release01Data:
    """What Tidings 0.1 left in the database, read back with PyMongo."""

    inbox: list[Document]  # bob's inbox documents, in ObjectId order
    receipts: list[Document]  # alice's receipts, in ObjectId order
    o1_delivered_at: str  # when o1 became ``delivered``, as alice was told


async def write_with_release_0_1(
    src: Path, mongo: AsyncMongoClient[Document], uri: str, database: str, workdir: Path
) -> Release01Data:
    """Let a real Tidings 0.1 process store bob's messages and their states, then stop it.

    alice sends o1..o6 and carol her own o4 (after alice's); bob, online, gets
    them all, acks o1 and o2 and reads o3. o4..o6 and carol's o4 stay ``sent``.
    """
    async with (
        tidings_serve(uri, database, workdir, pythonpath=src) as url,
        client(url) as alice,
        client(url) as carol,
        client(url) as bob,
    ):
        await alice.identify(ALICE)
        await carol.identify(CAROL)
        await bob.identify(BOB)
        for email, message_id in OLD_SENDS:
            await send(alice if email == ALICE else carol, email, message_id)
        assert await messages(bob, len(OLD_SENDS)) == [(e, i, "stored") for e, i in OLD_SENDS]
        for message_id in ("o1", "o2"):
            await bob.send({"type": "ack", "id": message_id})
        await bob.send({"type": "read", "id": "o3"})
        o1_delivered_at = (await state_frame(alice, "o1", "delivered"))["at"]
        await state_frame(alice, "o2", "delivered")
        await state_frame(alice, "o3", "read")

    db = mongo[database]
    inbox = await db[collection_for(BOB)].find().sort("_id", ASCENDING).to_list(None)
    receipts = await db[collection_for(ALICE)].find().sort("_id", ASCENDING).to_list(None)
    # What 0.1 wrote is schema 1: no position, no version, no schema marker.
    assert all(doc["k"] == "in" and doc.keys() == SCHEMA_1_INBOX_FIELDS for doc in inbox), inbox
    assert all(doc["k"] == "out" and "v" not in doc for doc in receipts), receipts
    assert [(doc["from"], doc["mid"], doc["state"]) for doc in inbox] == [
        (ALICE, "o1", "delivered"),
        (ALICE, "o2", "delivered"),
        (ALICE, "o3", "read"),
        (ALICE, "o4", "sent"),
        (CAROL, "o4", "sent"),
        (ALICE, "o5", "sent"),
        (ALICE, "o6", "sent"),
    ]
    assert [doc["mid"] for doc in receipts] == ["o1", "o2", "o3", "o4", "o5", "o6"]
    return Release01Data(inbox, receipts, o1_delivered_at)


@pytest.fixture
async def mongo(own_nx: NxServer) -> AsyncIterator[AsyncMongoClient[Document]]:
    """A PyMongo client of the test's own nx-27017, to read and write documents directly."""
    async with AsyncMongoClient[Document](own_nx.uri, serverSelectionTimeoutMS=2000) as mongo:
        yield mongo


async def inbox_by_position(coll: AsyncCollection[Document]) -> list[Document]:
    """The inbox documents of ``coll``, each with an integer ``seq``, by position."""
    docs = await coll.find({"k": "in"}).to_list(None)
    assert all(type(doc.get("seq")) is int for doc in docs), docs
    return sorted(docs, key=lambda doc: int(doc["seq"]))


async def test_new_code_serves_what_release_0_1_stored(
    release_0_1: Path, own_nx: NxServer, mongo: AsyncMongoClient[Document], tmp_path: Path
) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    old = await write_with_release_0_1(release_0_1, mongo, own_nx.uri, database, tmp_path)

    async with (
        tidings_serve(own_nx.uri, database, tmp_path) as url,
        client(url) as alice,
        client(url) as carol,
        client(url) as bob,
    ):
        await alice.identify(ALICE)
        await carol.identify(CAROL)
        await bob.identify(BOB)
        # The backlog: what bob never acked or read, oldest first, as 0.1 stored it.
        assert await messages(bob, 4) == [
            (ALICE, "o4", "sent"),
            (CAROL, "o4", "sent"),
            (ALICE, "o5", "sent"),
            (ALICE, "o6", "sent"),
        ]
        # Nothing else: the next frame bob gets is a message sent now.
        await send(alice, ALICE, "n1")
        assert await messages(bob, 1) == [(ALICE, "n1", "stored")]

        # since: everything stored after o2, in any state; the new message last.
        async with client(url) as replay:
            await replay.identify(BOB, since="o2")
            assert await messages(replay, 6) == [
                (ALICE, "o3", "read"),
                (ALICE, "o4", "sent"),
                (CAROL, "o4", "sent"),
                (ALICE, "o5", "sent"),
                (ALICE, "o6", "sent"),
                (ALICE, "n1", "sent"),
            ]
            await send(alice, ALICE, "n2")
            assert await messages(replay, 1) == [(ALICE, "n2", "stored")]
        assert await messages(bob, 1) == [(ALICE, "n2", "stored")]

        # o4 names two messages, one per sender: an ack must say whose.
        await bob.send({"type": "ack", "id": "o4"})
        error = await bob.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "invalid", "o4")
        await bob.send({"type": "ack", "id": "o4", "from": ALICE})
        assert await alice.states("o4", until="delivered") == ["delivered"]

        # A resend of o1 answers the state 0.1 stored, and when; nothing is stored.
        await alice.send_message(BOB, content(ALICE, "o1"), id="o1")
        answer = await alice.recv_until(lambda f: f.get("id") == "o1" and f["state"] != "received")
        assert [f["state"] for f in answer if f.get("id") == "o1"] == ["received", "delivered"]
        assert answer[-1]["at"] == old.o1_delivered_at

        # A fresh identification: carol's o4 is still pending, the new ones last.
        async with client(url) as fresh:
            await fresh.identify(BOB)
            assert await messages(fresh, 5) == [
                (CAROL, "o4", "sent"),
                (ALICE, "o5", "sent"),
                (ALICE, "o6", "sent"),
                (ALICE, "n1", "sent"),
                (ALICE, "n2", "sent"),
            ]
            await send(alice, ALICE, "n3")
            assert await messages(fresh, 1) == [(ALICE, "n3", "stored")]
        assert await messages(bob, 1) == [(ALICE, "n3", "stored")]
        await bob.send({"type": "ack", "id": "o4", "from": CAROL})
        assert await carol.states("o4", until="delivered") == ["delivered"]

    db = mongo[database]
    inbox = await inbox_by_position(db[collection_for(BOB)])
    # Positions follow 0.1's order (ObjectId order), then the new messages.
    assert [(doc["from"], doc["mid"]) for doc in inbox] == [
        *[(doc["from"], doc["mid"]) for doc in old.inbox],
        (ALICE, "n1"),
        (ALICE, "n2"),
        (ALICE, "n3"),
    ]
    assert [doc["_id"] for doc in inbox[: len(old.inbox)]] == [doc["_id"] for doc in old.inbox]
    assert len({doc["seq"] for doc in inbox}) == len(inbox)
    # Every inbox document was numbered or written by the new code; the receipts
    # 0.1 wrote are as they were, apart from the state the new code moved.
    assert all(doc["v"] == 2 for doc in inbox), inbox
    receipts = await db[collection_for(ALICE)].find({"k": "out"}).to_list(None)
    versions = {doc["mid"]: doc.get("v") for doc in receipts}
    assert versions == {**{f"o{n}": None for n in range(1, 7)}, "n1": 2, "n2": 2, "n3": 2}
    carol_receipts = await db[collection_for(CAROL)].find({"k": "out"}).to_list(None)
    assert [(doc["mid"], "v" in doc) for doc in carol_receipts] == [("o4", False)]
    assert await db[collection_for(BOB)].find_one({"_id": "schema"}) == {"_id": "schema", "v": 2}
    # The indexes of schema 2, found by their keys: nx-27017 names indexes itself,
    # so the drop of 0.1's "backlog" index by name cannot be seen here.
    indexes = (await db[collection_for(BOB)].index_information()).values()
    keys = [(index["key"], index.get("unique", False)) for index in indexes]
    assert ([("seq", 1)], True) in keys
    assert ([("k", 1), ("state", 1), ("seq", 1)], False) in keys


async def test_a_schema_1_message_written_after_the_upgrade_is_delivered(
    release_0_1: Path, own_nx: NxServer, mongo: AsyncMongoClient[Document], tmp_path: Path
) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    old = await write_with_release_0_1(release_0_1, mongo, own_nx.uri, database, tmp_path)
    db = mongo[database]

    async with tidings_serve(own_nx.uri, database, tmp_path) as url, client(url) as alice:
        await alice.identify(ALICE)
        async with client(url) as bob:
            # The first identification prepares bob's collection: numbered, marked.
            await bob.identify(BOB)
            assert [m[:2] for m in await messages(bob, 4)] == [
                (ALICE, "o4"),
                (CAROL, "o4"),
                (ALICE, "o5"),
                (ALICE, "o6"),
            ]
        assert await db[collection_for(BOB)].find_one({"_id": "schema"}) is not None
        numbered = await inbox_by_position(db[collection_for(BOB)])

        # A 0.1 process still running stores a message: an inbox document and a
        # receipt in exactly the shape it writes them (copies of its own).
        now = datetime.now(UTC)
        message_id = "stray"
        stray = {
            **old.inbox[-1],
            "_id": ObjectId(),
            "mid": message_id,
            "content": content(ALICE, message_id),
            "sent_at": now,
            "state": "stored",
            "at": {"stored": now},
        }
        assert stray.keys() == SCHEMA_1_INBOX_FIELDS
        receipt = {
            **old.receipts[-1],
            "_id": ObjectId(),
            "mid": message_id,
            "sent_at": now,
            "state": "stored",
            "at": {"stored": now},
        }
        await db[collection_for(ALICE)].insert_one(receipt)
        await db[collection_for(BOB)].insert_one(stray)

        async with client(url) as bob:
            await bob.identify(BOB)
            assert await messages(bob, 5) == [
                (ALICE, "o4", "sent"),
                (CAROL, "o4", "sent"),
                (ALICE, "o5", "sent"),
                (ALICE, "o6", "sent"),
                (ALICE, message_id, "stored"),
            ]
            assert await alice.states(message_id, until="sent") == ["sent"]
            await bob.send({"type": "ack", "id": message_id})
            assert await alice.states(message_id, until="delivered") == ["delivered"]

    inbox = await inbox_by_position(db[collection_for(BOB)])
    assert inbox[:-1] == numbered
    assert (inbox[-1]["mid"], inbox[-1]["v"]) == (message_id, 2)
    assert inbox[-1]["seq"] > max(int(doc["seq"]) for doc in numbered)
