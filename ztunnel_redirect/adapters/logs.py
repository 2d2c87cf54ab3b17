"""Logging set-up: structlog for our events, the standard library's loggers into the same stream.

Every line carries an ISO-8601 UTC `timestamp`, its `level` and the `event`, plus whatever is bound
with `structlog.contextvars.bound_contextvars(...)` in the current task: a pod worker binds
`pod`/`pod_uid` once and every line it logs carries them. Exceptions logged with
`log.exception(...)` or `exc_info=True` are rendered (a string `exception` field in JSON).

Libraries that log through `logging` (aiohttp, kubernetes_asyncio, asyncio) go to the same stream
in the same format, at warning and above (or the agent's level if that is stricter): their info
lines are noise to an operator. Their lines carry `logger` (the library's logger name).

Loggers are not cached on first use, so `structlog.testing.capture_logs()` keeps working after
`configure()`; `reset()` undoes `configure()` (tests).
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO, TypeVar

import structlog
from structlog.typing import Processor

from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.settings import LogFormat, LogLevel

__all__ = ["configure", "reset"]

_LEVELS: Final = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}


class _Handler(logging.StreamHandler[TextIO]):
    """Our handler on the root logger; its type is how `configure` finds the one it added."""


_Choice = TypeVar("_Choice", LogFormat, LogLevel)


def _parse(kind: type[_Choice], text: str, what: str) -> _Choice:
    try:
        return kind(text.strip().lower())
    except ValueError:
        choices = ", ".join(kind)
        raise ConfigError(f"Log {what} must be one of {choices}, not {text!r}.") from None


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route the standard library's logging; `stream` defaults to stderr."""
    log_format = _parse(LogFormat, fmt, "format")
    log_level = _LEVELS[_parse(LogLevel, level, "level")]
    out = sys.stderr if stream is None else stream

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if log_format is LogFormat.CONSOLE:
        # ConsoleRenderer formats exc_info itself (with its own, readable traceback layout).
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        exceptions: list[Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = [structlog.processors.format_exc_info]

    structlog.configure(
        processors=[*shared, structlog.processors.UnicodeDecoder(), *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    _remove_handlers(root)
    root.addHandler(handler)
    root.setLevel(max(log_level, logging.WARNING))


def reset() -> None:
    """Undo `configure()`: structlog's defaults, and our handler off the root logger."""
    structlog.reset_defaults()
    root = logging.getLogger()
    _remove_handlers(root)
    root.setLevel(logging.WARNING)


def _remove_handlers(root: logging.Logger) -> None:
    # Only ours: others (pytest's capture, an embedding program's) stay.
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
            handler.close()
