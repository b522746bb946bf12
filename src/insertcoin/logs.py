"""Structured logs: one event name and key-value fields per line, JSON when not on a
terminal (for log shippers), readable columns when a person is watching."""

import logging
import os
import sys
from typing import Any

import orjson

# structlog imports rich and pygments for pretty tracebacks whenever rich is installed (and
# typer installs it): 0.15 s of every start and 5 MiB, which is an eighth of a cabinet's
# 40 MB, for output these renderers never produce. rich is hidden while structlog loads
# (structlog then formats tracebacks plainly); typer can still import it afterwards. The
# agent and server packages import this module first, so it is structlog's first import.
_hide_rich = "structlog" not in sys.modules and "rich" not in sys.modules
if _hide_rich:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _hide_rich:
        del sys.modules["rich"]


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
