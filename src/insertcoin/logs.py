"""Structured logs: one event name and key-value fields per line, JSON when not on a
terminal (for log shippers), readable columns when a person is watching."""

import logging
import os
import sys
from typing import Any

import orjson
import structlog


def configure(level: str | None = None) -> None:
    name = (level or os.environ.get("INSERTCOIN_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelNamesMapping().get(name, logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    processors: list[structlog.types.Processor]
    factory: Any
    if sys.stderr.isatty():
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=False)]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        # orjson straight to bytes: a log line per grant state change is on the hot path.
        processors = [*shared, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
