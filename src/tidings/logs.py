"""JSON logs, one object a line, for log aggregators."""

from __future__ import annotations

import logging
import re
import sys
from urllib.parse import unquote_plus

from pythonjsonlogger.orjson import OrjsonFormatter

# A query parameter, and a bearer token in a header or subprotocol.
_PARAMETER = re.compile(r"(^|[?&\s])([^=&?/\s\"']+)=([^&\s\"']*)")
_BEARER = re.compile(r"(?i)(bearer[ .])[^\s,\"']+")


def _redact_parameter(match: re.Match[str]) -> str:
    # Starlette decodes parameter names, so ``access%5Ftoken`` is a token too.
    if unquote_plus(match[2]).lower() == "access_token":
        return f"{match[1]}{match[2]}=[redacted]"
    return match[0]


# uvicorn's websockets-sansio protocol never marks a handshake answered with a
# denial response (our 403/503) as complete, and then logs this as an error.
_DENIAL_NOISE = "ASGI callable returned without completing handshake."


def _scrub(record: logging.LogRecord) -> bool:
    """Keep tokens out of every log line, whoever logs it (uvicorn logs request paths)."""
    message = record.getMessage()
    if record.name == "uvicorn.error" and message == _DENIAL_NOISE:
        return False
    scrubbed = _BEARER.sub(r"\1[redacted]", _PARAMETER.sub(_redact_parameter, message))
    if scrubbed != message:
        record.msg, record.args = scrubbed, None
    # uvicorn attaches a terminal-coloured copy of its message; aggregators want one.
    record.__dict__.pop("color_message", None)
    return True


def configure_logging(level: str) -> None:
    """Send every logger's records, uvicorn's included, to stderr as JSON lines.

    The record's message is the event name (``connection_opened``,
    ``message_stored``, ...); its context (``conn``, ``email``, ``message_id``,
    ``state``, ...) comes as the ``extra`` fields of the call.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_scrub)
    handler.setFormatter(
        # orjson: a log line per message is on the hot path, and it encodes several times faster.
        OrjsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "message": "event",
            },
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
