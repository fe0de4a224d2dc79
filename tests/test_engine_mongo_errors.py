"""The MongoDB engine's errors: driver errors mapped once, with a reason that fits a line."""

from __future__ import annotations

import pytest
from pymongo.errors import AutoReconnect, PyMongoError, ServerSelectionTimeoutError

from tidings.engine.mongo import check_uri, redacted
from tidings.engine.mongo.errors import StreamClosed, guarded, mapped, reason
from tidings.errors import ConfigError, StoreUnavailable, TidingsError

# What PyMongo 4 says when no server answers, as it said it here.
SELECTION = (
    "127.0.0.1:1: [Errno 111] Connect call failed ('127.0.0.1', 1) (configured timeouts: "
    "socketTimeoutMS: 20000.0ms, connectTimeoutMS: 20000.0ms), Timeout: 0.999s, Topology "
    "Description: <TopologyDescription id: 6b17, topology_type: Unknown, servers: "
    "[<ServerDescription ('127.0.0.1', 1) server_type: Unknown, rtt: None, error=AutoReconnect("
    "\"127.0.0.1:1: [Errno 111] Connect call failed ('127.0.0.1', 1)\")>]>"
)


def test_a_selection_timeout_is_told_without_its_timeouts_and_topology() -> None:
    assert reason(ServerSelectionTimeoutError(SELECTION)) == (
        "127.0.0.1:1: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    )


def test_other_errors_keep_their_words_on_one_line() -> None:
    assert reason(AutoReconnect("connection\n  reset")) == "connection reset"


def test_mapped_raises_store_unavailable_with_the_reason() -> None:
    with pytest.raises(StoreUnavailable) as info, mapped():
        raise ServerSelectionTimeoutError(SELECTION)
    assert str(info.value) == (
        "database error: 127.0.0.1:1: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    )
    assert isinstance(info.value.__cause__, PyMongoError)


async def test_guarded_maps_a_coroutine_s_errors() -> None:
    @guarded
    async def failing() -> None:
        raise AutoReconnect("gone")

    with pytest.raises(StoreUnavailable, match="database error: gone"):
        await failing()


def test_stream_closed_is_in_the_tree_but_the_engine_s_own() -> None:
    assert issubclass(StreamClosed, TidingsError)
    assert StreamClosed.__module__ == "tidings.engine.mongo.errors"


def test_a_uri_in_a_log_line_has_no_credentials() -> None:
    assert redacted("mongodb://user:p%40ss@db-0.db:27017,db-1.db/app?tls=true") == (
        "mongodb://***@db-0.db:27017,db-1.db/app?tls=true"
    )
    assert redacted("mongodb+srv://cluster0.example.net/") == "mongodb+srv://cluster0.example.net/"


@pytest.mark.parametrize(
    "uri", ["http://db:27017", "mongodb://a:b:c@/x", "mongodb://db/?w=-5", "mongodb://"]
)
def test_a_uri_the_driver_refuses_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="TIDINGS_MONGODB_URI is not a MongoDB URI"):
        check_uri(uri)


@pytest.mark.parametrize(
    "uri", ["mongodb://127.0.0.1:1/", "mongodb+srv://cluster0.example.invalid/app"]
)
def test_a_uri_is_checked_without_connecting_or_resolving(uri: str) -> None:
    check_uri(uri)  # nothing listens on port 1, and .invalid never resolves
