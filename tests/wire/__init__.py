"""A MongoDB fake at the wire level, so that the real PyMongo, resume logic and all, runs over it.

``WireMongo`` is an asyncio TCP server on 127.0.0.1 that answers as a
single-node replica set (MongoDB 7.0, wire version 21). PyMongo connects to
it with ``?directConnection=true`` as to any server; the tests start and stop
it with ``async with WireMongo() as mongo``.

What it implements, after the MongoDB wire protocol and the driver
specifications (OP_MSG, server discovery and monitoring, change streams):

- framing: OP_MSG both ways (document sequences included), OP_QUERY in and
  OP_REPLY out for the first ``hello`` of a connection (``codec``);
- the handshake: ``hello``/``isMaster`` with a replica-set primary's fields
  and ``logicalSessionTimeoutMinutes``; sessions (``lsid``), ``txnNumber`` and
  ``$clusterTime`` are accepted and ignored; every reply carries
  ``operationTime``, the cluster time of the last write;
- CRUD on mongomock (``commands``): insert, update (upserts, replacements,
  arrayFilters), delete, find, aggregate, distinct, count, the index commands,
  listCollections, drop, dropDatabase, renameCollection; write results and
  duplicate-key ``writeErrors`` (11000) in MongoDB's shapes. Any other command
  is answered ``CommandNotFound`` and logged;
- change streams (``changes``): ``aggregate`` with ``$changeStream`` on a
  collection or a database (``aggregate: 1``), with ``resumeAfter``,
  ``startAfter``, ``startAtOperationTime`` and ``fullDocument``;
  ``postBatchResumeToken`` on every batch, empty ones included; ``getMore``
  waits up to ``maxTimeMS`` for events; ``killCursors``; events insert,
  update (``updateDescription``; ``fullDocument`` looked up when read, or
  null), replace, delete, drop, rename, dropDatabase, and invalidate where
  MongoDB sends it: after a drop or rename of a collection stream's
  collection, after dropDatabase on any stream; resuming after an
  invalidate needs ``startAfter`` (260); a token older than the oplog is 286;
  the stream's ``$match`` stages are applied to events with mongomock's
  query engine;
- faults, set by the test (``WireMongo``): the next N change-stream
  ``aggregate``s or ``getMore``s fail with a code and labels, or close their
  connection; ``forget()`` loses the oplog before now; ``hold()`` keeps
  getMores from answering until ``release()``; ``until()`` waits for a
  condition on the fake (getMores received or parked, writes), not a time.

What it does not: authentication, TLS, compression, transactions, the
exhaust/streaming ``hello`` (no ``topologyVersion``: PyMongo polls instead),
find cursors larger than one batch (everything comes in ``firstBatch``),
change-stream stages other than ``$match``, ``fullDocumentBeforeChange``,
``showExpandedEvents``, cluster-wide streams, and the server's own faults
(a failed getMore simply kills its cursor). Where it may differ from MongoDB:
``updatedFields`` comes from a diff of the document before and after the
write, not from the oplog entry (the same for ``$set``/``$unset``, which is
all Tidings writes); resume tokens are this fake's own, and one it cannot
parse is answered 260 (MongoDB's code for a malformed token was not checked);
an idle stream's high-water mark is the position of the last write, whatever
its namespace; the opening aggregate returns the events already there in
``firstBatch`` (the driver handles both); an injected getMore error kills
the cursor. PyMongo itself does not refuse ``watch`` on a standalone (tried:
only the server does, with 40573), so the fake answers as a replica set.
"""

from __future__ import annotations

from tests.wire.errors import CommandError
from tests.wire.server import RESUMABLE, WireMongo

__all__ = ["RESUMABLE", "CommandError", "WireMongo"]
