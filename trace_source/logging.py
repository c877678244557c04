"""Structured logging (structlog): JSON lines by default, one event per line on stderr.

Request handlers bind ``request_id``; every line carries ``timestamp`` (ISO 8601, UTC), ``level`` and ``event``.
"""

from __future__ import annotations

import logging
import sys
import time

import structlog


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the stdlib root logger (aiohttp, aiokafka, grpc log through it)."""
    lvl = getattr(logging, level.upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=shared,
    ))
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # aiohttp's access log is one line per request: too costly on the hot path, and our handlers log failures.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _RepeatFilter(logging.Filter):
    """Lets the same stdlib message (logger, template) through at most once per ``interval_s`` seconds.

    aiokafka logs ~30 identical connection errors per second while a broker is down; one line every few seconds
    says the same thing. The sinks log their own state changes through structlog and are not affected (their
    messages carry different event fields and are rare).
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("aiokafka", "kafka")):
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            return False
        if len(self._last) > 1000:  # bounded: message templates are few, but never grow without limit
            self._last.clear()
        self._last[key] = now
        return True
