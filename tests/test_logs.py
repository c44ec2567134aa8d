"""Log lines: their shape, their level filter, and the redaction that backs up the Secret type."""

from __future__ import annotations

import io
import json
import re

import pytest
import structlog
from structlog.typing import FilteringBoundLogger

from deribit_keeper import logs
from deribit_keeper.config import LogConfig, LogFormat, LogLevel, Secret

TOKEN = "1582628593469.1MbQ-J_4.CBP-aB3dEf"


def render(
    level: LogLevel = "debug", fmt: LogFormat = "json"
) -> tuple[io.StringIO, FilteringBoundLogger]:
    stream = io.StringIO()
    logs.configure(LogConfig(level=level, format=fmt), stream=stream)
    return stream, logs.get_logger(account="main")


def test_json_lines_carry_timestamp_level_event_and_account() -> None:
    """Every JSON line has an ISO-8601 UTC timestamp, the level, the event and bound fields."""
    stream, log = render()
    log.info("session.ready", cod_scope="connection")
    line = json.loads(stream.getvalue())
    assert line["event"] == "session.ready" and line["level"] == "info"
    assert line["account"] == "main" and line["cod_scope"] == "connection"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])


def test_level_filters_lower_events() -> None:
    """At level warning, info and debug lines are not written."""
    stream, log = render(level="warning")
    log.debug("session.test_request_answered")
    log.info("session.ready")
    log.warning("session.lost", reason="closed_by_server")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["session.lost"]


def test_console_format_is_one_readable_line() -> None:
    """format: console writes one human line per event with its fields."""
    stream, log = render(fmt="console")
    log.info("session.ready", cod_scope="account")
    (line,) = stream.getvalue().splitlines()
    assert "session.ready" in line and "cod_scope=account" in line and "account=main" in line


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secret_values_secret_keys_and_token_shapes_are_redacted(fmt: LogFormat) -> None:
    """A Secret, a field named like a credential, and a token inside text never print."""
    stream, log = render(fmt=fmt)
    log.info(
        "oops",
        value=Secret("s3cr3t-value"),
        client_secret="plain-secret",
        access_token="raw-token-value",
        note=f"server said {TOKEN} in passing",
    )
    out = stream.getvalue()
    for leaked in ("s3cr3t-value", "plain-secret", "raw-token-value", TOKEN, "1MbQ-J_4"):
        assert leaked not in out
    assert "in passing" in out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_token_inside_an_exception_traceback_is_redacted(fmt: LogFormat) -> None:
    """Tracebacks are rendered to text before redaction, so an exception cannot leak a token."""
    stream, log = render(fmt=fmt)
    try:
        raise ValueError(f"bad answer {TOKEN}")
    except ValueError:
        log.exception("session.unexpected_error")
    out = stream.getvalue()
    assert "ValueError" in out and TOKEN not in out


def test_reconfigure_applies_at_once() -> None:
    """A second configure (a reload) changes the level for loggers made before it."""
    stream, log = render(level="error")
    log.info("before")
    logs.configure(LogConfig(level="info", format="json"), stream=stream)
    log.info("after")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["after"]
    structlog.reset_defaults()
