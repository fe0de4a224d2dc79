"""JSON logs, one object a line, for log aggregators."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def _drop_colour(record: logging.LogRecord) -> bool:
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
    handler.addFilter(_drop_colour)
    handler.setFormatter(
        JsonFormatter(
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
