"""Structured logging: the one place where structlog is configured.

Every line is one event with a stable name (see ``events.py``), a UTC ISO-8601 ``timestamp`` and a
``level``; lines about an account carry ``account`` because sessions bind it once.

Secrets are kept out of logs first by their type (``config.Secret`` never shows its value) and by
never passing tokens to a logger. ``redact_secrets`` is the second line of defence: it blanks
``Secret`` values, any field whose name says it holds a secret, and anything shaped like a Deribit
token inside a string (an exception text, say).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

from .config import LogConfig, Secret

REDACTED: Final = "***"

# Field names that hold credentials whatever their value's type.
_SECRET_KEYS: Final = frozenset(
    {
        "client_secret",
        "access_token",
        "refresh_token",
        "token",
        "signature",
        "secret",
        "password",
        "authorization",
    }
)

# Deribit tokens look like "1582628593469.1MbQ-J_4.CBP-...": 13 digits, a dot, then base64url parts.
_TOKEN_SHAPE: Final = re.compile(r"\b\d{13}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_.-]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, str) and "." in value:
        return _TOKEN_SHAPE.sub(REDACTED, value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Blank secret-bearing fields, ``Secret`` values and token-shaped substrings."""
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if key.lower() in _SECRET_KEYS else _scrub(value)
    return event_dict


_current: LogConfig | None = None
_stream: TextIO | None = None
_threshold = logging.NOTSET  # the configured level: every level passes until ``configure``


def enabled(level: int) -> bool:
    """Whether an event at ``level`` would be written.

    For the hot paths (a heartbeat's answer, every session event) that would otherwise build an
    event only for structlog to drop it: its lazy logger resolves the configuration at every
    call, which costs more than the rest of answering a test_request.
    """
    return level >= _threshold


def current() -> LogConfig | None:
    """The settings of the last ``configure`` call (a reload compares against them)."""
    return _current


def configure(log: LogConfig, stream: TextIO | None = None) -> None:
    """Install the processor chain for ``log.format`` at ``log.level``, writing to ``stream``.

    Safe to call again (on reload): loggers are not cached, so the new settings apply at once.
    Without ``stream`` a reconfiguration keeps writing where the previous one did (stdout at
    first).
    """
    global _current, _stream, _threshold
    _current, _stream = log, stream if stream is not None else _stream
    _threshold = logging.getLevelNamesMapping()[log.level.upper()]
    renderer: structlog.types.Processor
    if log.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks become text before redaction, so a token in an exception is blanked too.
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_threshold),
        logger_factory=structlog.PrintLoggerFactory(_stream if _stream is not None else sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger with ``bound`` fields on every line (``account=...`` for a session).

    It stays a lazy proxy that reads the configuration at each call, so a reload's new level and
    format reach loggers made before it (``.bind()`` would freeze the configuration of the day).
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**bound)
    return logger
