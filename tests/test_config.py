"""Settings from TIDINGS_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tidings.config import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.mongodb_uri is None
    assert settings.database == "tidings"
    assert settings.change_stream_scope == "database"
    assert settings.dev is False
    assert settings.jwt_secret is None
    assert settings.max_frame_bytes == 65536
    assert (settings.ping_interval, settings.ping_timeout) == (20.0, 20.0)
    assert settings.log_level == "INFO"
    assert settings.embedded is True
    assert settings.origins == frozenset()


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TIDINGS_HOST": "10.1.2.3",
        "TIDINGS_PORT": "9001",
        "TIDINGS_MONGODB_URI": "mongodb://db:27017/?replicaSet=rs0",
        "TIDINGS_DATABASE": "chat",
        "TIDINGS_CHANGE_STREAM_SCOPE": "collection",
        "TIDINGS_DEV": "1",
        "TIDINGS_JWT_SECRET": "s3cret",
        "TIDINGS_JWT_ISSUER": "https://issuer.example",
        "TIDINGS_JWT_AUDIENCE": "tidings",
        "TIDINGS_MAX_FRAME_BYTES": "1024",
        "TIDINGS_PING_INTERVAL": "5",
        "TIDINGS_PING_TIMEOUT": "2.5",
        "TIDINGS_LOG_LEVEL": "DEBUG",
        "TIDINGS_SEND_QUEUE_SIZE": "8",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.host, settings.port) == ("10.1.2.3", 9001)
    assert settings.mongodb_uri == "mongodb://db:27017/?replicaSet=rs0"
    assert settings.database == "chat"
    assert settings.change_stream_scope == "collection"
    assert settings.dev is True
    assert settings.jwt_secret == "s3cret"
    assert (settings.jwt_issuer, settings.jwt_audience) == ("https://issuer.example", "tidings")
    assert settings.max_frame_bytes == 1024
    assert (settings.ping_interval, settings.ping_timeout) == (5.0, 2.5)
    assert settings.log_level == "DEBUG"
    assert settings.send_queue_size == 8
    assert settings.embedded is False


def test_the_jwt_secret_stays_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "hunter2")
    assert "hunter2" not in repr(Settings())


def test_unknown_tidings_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_NO_SUCH_THING", "x")
    assert Settings().port == 8000


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIDINGS_PORT", "http"),
        ("TIDINGS_PORT", "70000"),
        ("TIDINGS_PORT", "-1"),
        ("TIDINGS_CHANGE_STREAM_SCOPE", "cluster"),
        ("TIDINGS_DEV", "maybe"),
        ("TIDINGS_MAX_FRAME_BYTES", "0"),
        ("TIDINGS_PING_INTERVAL", "-1"),
        ("TIDINGS_PING_TIMEOUT", "0"),
        ("TIDINGS_LOG_LEVEL", "LOUD"),
        ("TIDINGS_SEND_QUEUE_SIZE", "0"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    field = name.removeprefix("TIDINGS_").lower()
    assert field in str(info.value)


@pytest.mark.parametrize(("value", "dev"), [("1", True), ("true", True), ("0", False)])
def test_dev_flag(monkeypatch: pytest.MonkeyPatch, value: str, dev: bool) -> None:
    monkeypatch.setenv("TIDINGS_DEV", value)
    assert Settings().dev is dev


def test_origins_are_normalised() -> None:
    settings = Settings(
        allowed_origins=" https://App.Example.com/ ,http://localhost:3000,, ,https://app.example.com"
    )
    assert settings.origins == frozenset({"https://app.example.com", "http://localhost:3000"})


@pytest.mark.parametrize("value", [None, "", " , ,"])
def test_no_origins(value: str | None) -> None:
    assert Settings(allowed_origins=value).origins == frozenset()


@pytest.mark.parametrize(("uri", "embedded"), [(None, True), ("mongodb://localhost:27017", False)])
def test_embedded(uri: str | None, embedded: bool) -> None:
    assert Settings(mongodb_uri=uri).embedded is embedded


@pytest.mark.parametrize("uri", ["", "  "])
def test_an_empty_mongodb_uri_is_a_configuration_error(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty Secret in a Deployment must not give every pod a store of its own.
    monkeypatch.setenv("TIDINGS_MONGODB_URI", uri)
    with pytest.raises(ValidationError, match="TIDINGS_MONGODB_URI is set but empty"):
        Settings()


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1
    assert settings.model_copy(update={"port": 1}).port == 1


def test_retention_is_unset_by_default_and_read_in_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().retention is None  # keep every message, as before the setting existed
    monkeypatch.setenv("TIDINGS_RETENTION", "86400")
    assert Settings().retention == 86400.0


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_retention_must_be_a_positive_number(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Zero would expire a message the moment it is acknowledged: surely a typo.
    monkeypatch.setenv("TIDINGS_RETENTION", value)
    with pytest.raises(ValidationError, match="retention"):
        Settings()


def test_a_drain_deadline_must_leave_the_frames_in_hand_an_operation_budget() -> None:
    # 5 s of delay, twice the 5 s budget and the margin: 16 s at least.
    with pytest.raises(ValidationError, match="TIDINGS_DRAIN_DEADLINE"):
        Settings(drain_deadline=16)
    assert Settings(drain_deadline=16.5).drain_deadline == 16.5
    assert Settings(drain_delay=0, mongodb_timeout=1, drain_deadline=3.5).drain_deadline == 3.5
