"""The MongoDB wire protocol's framing: OP_MSG both ways, OP_QUERY in and OP_REPLY out.

PyMongo sends its first ``hello`` of every connection as a legacy OP_QUERY on
``admin.$cmd`` (it learns from the answer that OP_MSG is understood), and
every later command as OP_MSG. Nothing here is compressed: the server never
offers a compressor, so the driver never sends OP_COMPRESSED.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

import bson

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_MORE_TO_COME = 1 << 1


@dataclass(frozen=True)
class Request:
    """One command as it came: its body, document sequences merged in."""

    request_id: int
    op_code: int
    command: dict[str, Any]
    # moreToCome on a request: the client expects no answer (unacknowledged writes).
    no_reply: bool = False


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The next request on ``reader``; ``asyncio.IncompleteReadError`` at end of stream."""
    length, request_id, _, op_code = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    payload = await reader.readexactly(length - _HEADER.size)
    if op_code == OP_MSG:
        command, no_reply = _op_msg(payload)
        return Request(request_id, op_code, command, no_reply)
    if op_code == OP_QUERY:
        return Request(request_id, op_code, _op_query(payload))
    raise ValueError(f"opcode {op_code} is not spoken here")


def _op_msg(payload: bytes) -> tuple[dict[str, Any], bool]:
    (flags,) = struct.unpack_from("<I", payload)
    offset, body, sequences = 4, None, {}
    while offset < len(payload):
        kind = payload[offset]
        offset += 1
        if kind == 0:
            (size,) = struct.unpack_from("<i", payload, offset)
            body = bson.decode(payload[offset : offset + size])
            offset += size
        elif kind == 1:
            (size,) = struct.unpack_from("<i", payload, offset)
            end = offset + size
            name_end = payload.index(b"\0", offset + 4)
            name = payload[offset + 4 : name_end].decode()
            sequences[name] = bson.decode_all(payload[name_end + 1 : end])
            offset = end
        else:
            raise ValueError(f"OP_MSG section kind {kind}")
    assert body is not None, "an OP_MSG without a body"
    body.update(sequences)  # Sequences are only a framing of the body's array fields.
    return body, bool(flags & _MORE_TO_COME)


def _op_query(payload: bytes) -> dict[str, Any]:
    name_end = payload.index(b"\0", 4)
    namespace = payload[4:name_end].decode()
    if not namespace.endswith(".$cmd"):
        raise ValueError(f"OP_QUERY is only answered for commands, not on {namespace}")
    offset = name_end + 1 + 8  # numberToSkip, numberToReturn
    (size,) = struct.unpack_from("<i", payload, offset)
    query = bson.decode(payload[offset : offset + size])
    # A legacy command may come wrapped with a read preference.
    command: dict[str, Any] = query.get("$query", query)
    command.setdefault("$db", namespace.removesuffix(".$cmd"))
    return command


def encode_reply(request: Request, reply: dict[str, Any], reply_id: int) -> bytes:
    """``reply`` framed as the answer to ``request``: OP_REPLY to OP_QUERY, OP_MSG to OP_MSG."""
    doc = bson.encode(reply)
    if request.op_code == OP_QUERY:
        body = struct.pack("<iqii", 0, 0, 0, 1) + doc
        op_code = OP_REPLY
    else:
        body = struct.pack("<IB", 0, 0) + doc
        op_code = OP_MSG
    return _HEADER.pack(_HEADER.size + len(body), reply_id, request.request_id, op_code) + body
