"""CRUD commands on mongomock, each write recorded in the oplog for the change streams.

The commands are those Tidings' MongoDB engine and the tests send; any other
is answered ``CommandNotFound`` (59), so that a new one shows up at once.
Write results have MongoDB's shapes: ``n``, ``nModified``, ``upserted``, and
``writeErrors`` with code 11000 for a duplicate key, ordered writes stopping
at the first error and unordered ones going on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import mongomock
from bson import Int64
from pymongo.errors import DuplicateKeyError, OperationFailure

from tests.wire.changes import Oplog
from tests.wire.errors import CommandError

Reply = dict[str, Any]
_MISSING = object()


class Crud:
    """The databases, in an in-process mongomock client, behind the wire's commands."""

    def __init__(self) -> None:
        self.client: Any = mongomock.MongoClient()
        self.oplog = Oplog(self._current)
        self._handlers: dict[str, Callable[[str, Mapping[str, Any]], Reply]] = {
            "insert": self._insert,
            "update": self._update,
            "delete": self._delete,
            "find": self._find,
            "aggregate": self._aggregate,
            "distinct": self._distinct,
            "count": self._count,
            "createIndexes": self._create_indexes,
            "dropIndexes": self._drop_indexes,
            "listIndexes": self._list_indexes,
            "listCollections": self._list_collections,
            "drop": self._drop,
            "dropDatabase": self._drop_database,
            "renameCollection": self._rename,
        }

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a command answered here."""
        return name in self._handlers

    def run(self, name: str, command: Mapping[str, Any]) -> Reply:
        """Run command ``name``; a failure comes out as ``CommandError``."""
        db = command["$db"]
        try:
            return self._handlers[name](db, command)
        except OperationFailure as exc:  # mongomock raises PyMongo's errors
            raise CommandError(exc.code or 2, str(exc)) from exc

    def _current(self, db: str, coll: str, key: Any) -> Mapping[str, Any] | None:
        doc: Mapping[str, Any] | None = self.client[db][coll].find_one({"_id": key})
        return doc

    def _coll(self, db: str, command: Mapping[str, Any], name: str) -> Any:
        return self.client[db][command[name]]

    # ------------------------------------------------------------------ writes

    def _insert(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "insert")
        n, errors = 0, []
        for index, doc in enumerate(command.get("documents", [])):
            try:
                coll.insert_one(doc)
            except DuplicateKeyError as exc:
                errors.append(_write_error(index, exc))
                if command.get("ordered", True):
                    break
                continue
            n += 1
            stored = coll.find_one({"_id": doc["_id"]})
            self.oplog.append(db, coll.name, "insert", key=doc["_id"], doc=stored)
        return _write_reply(n, errors)

    def _update(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "update")
        n = modified = 0
        errors: list[Reply] = []
        upserted: list[Reply] = []
        for index, statement in enumerate(command.get("updates", [])):
            try:
                matched, changed, new_id = self._update_one_statement(db, coll, statement)
            except DuplicateKeyError as exc:
                errors.append(_write_error(index, exc))
                if command.get("ordered", True):
                    break
                continue
            n += matched + (new_id is not _MISSING)
            modified += changed
            if new_id is not _MISSING:
                upserted.append({"index": index, "_id": new_id})
        reply = _write_reply(n, errors)
        reply["nModified"] = modified
        if upserted:
            reply["upserted"] = upserted
        return reply

    def _update_one_statement(
        self, db: str, coll: Any, statement: Mapping[str, Any]
    ) -> tuple[int, int, Any]:
        """Matched, modified, and the upserted ``_id`` (``_MISSING`` if none)."""
        query, change = statement["q"], statement["u"]
        multi, upsert = statement.get("multi", False), statement.get("upsert", False)
        before = {doc["_id"]: doc for doc in coll.find(query)}
        replace = not any(key.startswith("$") for key in change)
        options: dict[str, Any] = {"upsert": upsert}
        if "arrayFilters" in statement:
            options["array_filters"] = statement["arrayFilters"]
        if replace:
            result = coll.replace_one(query, change, upsert=upsert)
        elif multi:
            result = coll.update_many(query, change, **options)
        else:
            result = coll.update_one(query, change, **options)
        changed = 0
        for key, old in before.items():
            new = coll.find_one({"_id": key})
            if new is None or new == old:
                continue
            changed += 1
            if replace:
                self.oplog.append(db, coll.name, "replace", key=key, doc=new)
            else:
                updated, removed = _diff(old, new)
                self.oplog.append(
                    db, coll.name, "update", key=key, updated=updated, removed=tuple(removed)
                )
        new_id = result.upserted_id if result.upserted_id is not None else _MISSING
        if new_id is not _MISSING:
            doc = coll.find_one({"_id": new_id})
            self.oplog.append(db, coll.name, "insert", key=new_id, doc=doc)
        return result.matched_count, changed, new_id

    def _delete(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "delete")
        n = 0
        for statement in command.get("deletes", []):
            docs = list(coll.find(statement["q"]))
            for doc in docs[:1] if statement.get("limit") == 1 else docs:
                coll.delete_one({"_id": doc["_id"]})
                self.oplog.append(db, coll.name, "delete", key=doc["_id"])
                n += 1
        return _write_reply(n, [])

    # ------------------------------------------------------------------ reads

    def _find(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "find")
        cursor = coll.find(command.get("filter") or {}, command.get("projection"))
        if command.get("sort"):
            cursor = cursor.sort(list(command["sort"].items()))
        if command.get("skip"):
            cursor = cursor.skip(command["skip"])
        if command.get("limit"):
            cursor = cursor.limit(abs(command["limit"]))
        return _cursor(db, coll.name, list(cursor))

    def _aggregate(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "aggregate")
        return _cursor(db, coll.name, list(coll.aggregate(command.get("pipeline", []))))

    def _distinct(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "distinct")
        values = coll.distinct(command["key"], command.get("query") or {})
        return {"values": values, "ok": 1.0}

    def _count(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "count")
        return {"n": coll.count_documents(command.get("query") or {}), "ok": 1.0}

    # ------------------------------------------------------------------ collections

    def _create_indexes(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "createIndexes")
        before = len(coll.index_information()) if command["createIndexes"] in self._names(db) else 0
        for spec in command["indexes"]:
            options = {k: v for k, v in spec.items() if k not in ("key", "v")}
            coll.create_index(list(spec["key"].items()), **options)
        after = len(coll.index_information())
        return {"numIndexesBefore": max(before, 1), "numIndexesAfter": after, "ok": 1.0}

    def _drop_indexes(self, db: str, command: Mapping[str, Any]) -> Reply:
        if command["dropIndexes"] not in self._names(db):
            raise CommandError(26, f"ns not found {db}.{command['dropIndexes']}")
        coll = self._coll(db, command, "dropIndexes")
        try:
            coll.drop_index(command["index"])
        except OperationFailure as exc:
            raise CommandError(27, str(exc)) from exc
        return {"ok": 1.0}

    def _list_indexes(self, db: str, command: Mapping[str, Any]) -> Reply:
        coll = self._coll(db, command, "listIndexes")
        docs = [
            {"v": 2, "key": dict(info.pop("key")), "name": name, **info}
            for name, info in coll.index_information().items()
        ]
        return _cursor(db, coll.name, docs)

    def _list_collections(self, db: str, command: Mapping[str, Any]) -> Reply:
        docs = [{"name": name, "type": "collection", "options": {}} for name in self._names(db)]
        return _cursor(db, "$cmd.listCollections", docs)

    def _drop(self, db: str, command: Mapping[str, Any]) -> Reply:
        name = command["drop"]
        if name in self._names(db):  # MongoDB 7 drops a missing collection quietly.
            self.client[db].drop_collection(name)
            self.oplog.append(db, name, "drop")
        return {"ns": f"{db}.{name}", "ok": 1.0}

    def _drop_database(self, db: str, command: Mapping[str, Any]) -> Reply:
        for name in self._names(db):
            self.client[db].drop_collection(name)
            self.oplog.append(db, name, "drop")
        self.client.drop_database(db)
        self.oplog.append(db, None, "dropDatabase")
        return {"dropped": db, "ok": 1.0}

    def _rename(self, db: str, command: Mapping[str, Any]) -> Reply:
        source_db, _, source = command["renameCollection"].partition(".")
        target_db, _, target = command["to"].partition(".")
        if source_db != target_db:
            raise CommandError(2, "the fake renames within a database only")
        self.client[source_db][source].rename(target, dropTarget=command.get("dropTarget", False))
        self.oplog.append(source_db, source, "rename", to={"db": target_db, "coll": target})
        return {"ok": 1.0}

    def _names(self, db: str) -> list[str]:
        names: list[str] = self.client[db].list_collection_names()
        return names


def _write_error(index: int, exc: DuplicateKeyError) -> Reply:
    return {"index": index, "code": exc.code or 11000, "errmsg": str(exc)}


def _write_reply(n: int, errors: list[Reply]) -> Reply:
    reply: Reply = {"n": n, "ok": 1.0}
    if errors:
        reply["writeErrors"] = errors
    return reply


def _cursor(db: str, coll: str, docs: list[Any]) -> Reply:
    # Everything in the first batch, cursor id 0: a cursor the driver need not getMore.
    return {"cursor": {"firstBatch": docs, "id": Int64(0), "ns": f"{db}.{coll}"}, "ok": 1.0}


def _diff(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> tuple[Reply, list[str]]:
    """An update's ``updatedFields`` and ``removedFields``, as dotted paths.

    MongoDB derives them from the oplog entry of the update; a diff of the
    document before and after gives the same for ``$set`` and ``$unset`` of
    fields and subfields, which is all Tidings writes.
    """
    updated: Reply = {}
    removed: list[str] = []
    for key, value in new.items():
        path = f"{prefix}{key}"
        if key not in old:
            updated[path] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            more, gone = _diff(old[key], value, f"{path}.")
            updated.update(more)
            removed.extend(gone)
        elif old[key] != value:
            updated[path] = value
    removed.extend(f"{prefix}{key}" for key in old if key not in new)
    return updated, removed
