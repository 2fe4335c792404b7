"""Log line formats, one place for the server and the engine-core process (ADSA_LOG_FORMAT)."""

from __future__ import annotations

import logging

# request_id: the HTTP request a line is about (the server's filter sets it; "-" elsewhere)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def log_formatter(log_format: str) -> logging.Formatter:
    """"text", or "json": one JSON object per line for log pipelines (python-json-logger, the server's
    dependency, imported only then)."""
    if log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            timestamp="time",  # ISO 8601, UTC
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of the message
            defaults={"request_id": "-"},
        )
    return logging.Formatter(TEXT_FORMAT, defaults={"request_id": "-"})
