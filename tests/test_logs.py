"""JSON logs, one object a line."""

from __future__ import annotations

import logging
import re

import orjson
import pytest

from tidings.logs import configure_logging

pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(err: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in err.splitlines() if line.strip()]


def test_one_json_object_per_line_with_the_standard_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    log = logging.getLogger("tidings.test")
    log.info("message_stored", extra={"conn": "c1", "email": "a@b.io", "message_id": "m1"})
    log.warning("slow_consumer", extra={"queued": 3})
    records = lines(capsys.readouterr().err)
    assert len(records) == 2
    first, second = records
    assert first["event"] == "message_stored"
    assert first["level"] == "INFO"
    assert first["logger"] == "tidings.test"
    assert isinstance(first["time"], str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", first["time"])
    assert (first["conn"], first["email"], first["message_id"]) == ("c1", "a@b.io", "m1")
    assert (second["event"], second["level"], second["queued"]) == ("slow_consumer", "WARNING", 3)
    assert "message" not in first
    assert "color_message" not in first


def test_the_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    log = logging.getLogger("tidings.test")
    log.info("hidden")
    log.error("shown")
    assert [r["event"] for r in lines(capsys.readouterr().err)] == ["shown"]
    assert logging.getLogger().level == logging.WARNING


def test_uvicorn_logs_go_through_the_root_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(logging.StreamHandler())
    uvicorn_error.propagate = False
    configure_logging("INFO")
    assert uvicorn_error.handlers == []
    assert uvicorn_error.propagate is True
    uvicorn_error.info("Started server process", extra={"color_message": "\x1b[1mStarted\x1b[0m"})
    (record,) = lines(capsys.readouterr().err)
    assert record["event"] == "Started server process"
    assert record["logger"] == "uvicorn.error"
    assert "color_message" not in record


def test_exceptions_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("tidings.test").exception("crashed")
    (record,) = lines(capsys.readouterr().err)
    assert record["event"] == "crashed"
    assert "ValueError: boom" in str(record["exc_info"])


def test_configuring_twice_keeps_one_handler() -> None:
    configure_logging("INFO")
    configure_logging("DEBUG")
    assert len(logging.getLogger().handlers) == 1
    assert logging.getLogger().level == logging.DEBUG


# --- tokens never reach a log line -------------------------------------------------------

UVICORN_ACCEPTED = '%s - "WebSocket %s" [accepted]'


def test_an_access_token_in_a_uvicorn_message_is_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    logging.getLogger("uvicorn.error").info(
        UVICORN_ACCEPTED, "127.0.0.1:5000", "/ws?access_token=SECRET&x=1"
    )
    err = capsys.readouterr().err
    assert "SECRET" not in err
    (record,) = lines(err)
    assert record["event"] == (
        '127.0.0.1:5000 - "WebSocket /ws?access_token=[redacted]&x=1" [accepted]'
    )
    assert record["logger"] == "uvicorn.error"


def test_an_access_token_at_the_end_of_a_query_is_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" %d', "10.0.0.1:1", "/ws?x=1&access_token=SECRET", 403
    )
    err = capsys.readouterr().err
    assert "SECRET" not in err
    (record,) = lines(err)
    assert record["event"] == '10.0.0.1:1 - "WebSocket /ws?x=1&access_token=[redacted]" 403'


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Authorization: Bearer SECRET", "Authorization: Bearer [redacted]"),
        ("header Bearer SECRET.PART.TWO next", "header Bearer [redacted] next"),
        ("offered bearer.SECRET and tidings.v1", "offered bearer.[redacted] and tidings.v1"),
        ("a=1 access_token=SECRET b=2", "a=1 access_token=[redacted] b=2"),
    ],
)
def test_bearer_tokens_are_redacted_and_the_rest_kept(
    capsys: pytest.CaptureFixture[str], message: str, expected: str
) -> None:
    configure_logging("INFO")
    logging.getLogger("tidings.test").warning(message)
    err = capsys.readouterr().err
    assert "SECRET" not in err
    (record,) = lines(err)
    assert record["event"] == expected


def test_tokens_in_args_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("tidings.test").info("handshake with %s from %s", "Bearer SECRET", "c1")
    err = capsys.readouterr().err
    assert "SECRET" not in err
    (record,) = lines(err)
    assert record["event"] == "handshake with Bearer [redacted] from c1"


def test_messages_without_tokens_are_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = logging.getLogger("tidings.test")
    log.info("%s - %s", "plain", "text & more", extra={"conn": "c1"})
    log.info("%d%% done, %s", 100, "access granted")
    first, second = lines(capsys.readouterr().err)
    assert first["event"] == "plain - text & more"
    assert first["conn"] == "c1"
    assert second["event"] == "100% done, access granted"


def test_a_percent_encoded_access_token_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("uvicorn.error").info(
        UVICORN_ACCEPTED, "127.0.0.1:5000", "/ws?access%5Ftoken=SECRET"
    )
    assert "SECRET" not in capsys.readouterr().err


def test_an_upper_case_bearer_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("tidings.test").info("Authorization: BEARER SECRET")
    assert "SECRET" not in capsys.readouterr().err


def test_uvicorns_false_alarm_after_a_denial_response_is_dropped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    logging.getLogger("uvicorn.error").error("ASGI callable returned without completing handshake.")
    logging.getLogger("tidings.endpoint").error(
        "ASGI callable returned without completing handshake."
    )
    lines = capsys.readouterr().err.splitlines()
    assert [orjson.loads(line)["logger"] for line in lines] == ["tidings.endpoint"]
