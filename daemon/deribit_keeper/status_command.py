"""``deribit-keeper status``: the running keeper's ``/status`` as a table an operator reads at a
glance, and an exit code a script can act on.

The document already says everything (http.py builds it from ``Session.snapshot()`` and each
gateway's), but it is JSON with ISO timestamps: nobody on a trading desk should have to subtract
``cod_confirmed_at`` from the clock in their head to know whether an account is protected.

Exit codes keep apart the two things a script must not confuse: 0 every account is ready, 1 the
keeper answered and some account is not (or the keeper is stopping), 2 the keeper could not be
asked at all (nothing listens, no answer within ``FETCH_TIMEOUT_S``, or what answered is not a
keeper's status document). A config that names no endpoint stays 78, as everywhere in the CLI.

Everything in the document is data, not terminal input: an account name, an error reason or a
local client id holding an ANSI escape, a newline or a bidi override is shown with those
characters replaced, so it can neither recolour the terminal nor forge a row. Colour itself is
only for a terminal, and never with ``NO_COLOR`` set (https://no-color.org).

The formatting is pure (``render``: a document and a clock reading in, lines out), so it is
tested without a network; ``fetch`` is the only I/O. Like ``probe``, it uses ``http.client``
rather than urllib: a proxy from the environment must not answer for the keeper's own endpoint,
and a redirect would show some other page's document.
"""

from __future__ import annotations

import http.client
import json
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

from . import __version__

# http.py's route. Not imported from there: that would load the whole server (hypercorn, the
# gateway, the sessions: half a second) into a command that only reads one page;
# test_status_command checks that the two agree.
STATUS_PATH: Final = "/status"
EX_READY: Final = 0
EX_NOT_READY: Final = 1
EX_UNREACHABLE: Final = 2
# The keeper answers /status from memory within milliseconds; five seconds without an answer is a
# hung process or the wrong host, and a monitoring script must not hang with it. Bounds the
# connect and each read, as cancel-all's timeout does.
FETCH_TIMEOUT_S: Final = 5.0
# A keeper of 1,000 accounts with their links serves about 1 MB; far more is not a keeper.
_BODY_MAX: Final = 32 * 1024 * 1024
# Widths past which a cell is cut with an ellipsis, so that one long value cannot push a row
# past a terminal's width. Names are not cut: the config bounds them (64) and they identify.
ERROR_WIDTH: Final = 40
GATEWAY_WIDTH: Final = 40
_ELLIPSIS: Final = "\N{HORIZONTAL ELLIPSIS}"
_NONE: Final = "-"  # never happened, or nothing there
_UNREADABLE: Final = "?"  # present, but not a value this command understands
_COLUMN_GAP: Final = "  "
_COLUMNS: Final = (
    "ACCOUNT",
    "STATE",
    "COD CONFIRMED",
    "QUIET",
    "RECONNECTS",
    "LAST ERROR",
    "GATEWAY",
)
_RIGHT_ALIGNED: Final = frozenset({"COD CONFIRMED", "QUIET", "RECONNECTS"})
_STATE_COLUMN: Final = _COLUMNS.index("STATE")

# SGR colours for the state word: what is up, what is on its way (or waiting to retry), and
# everything else (lost, stopped, a COD drift being repaired, a state this version does not know).
_GREEN: Final = "\x1b[32m"
_YELLOW: Final = "\x1b[33m"
_RED: Final = "\x1b[31m"
_RESET: Final = "\x1b[0m"
_STATE_COLOURS: Final = {
    "ready": _GREEN,
    "connecting": _YELLOW,
    "authenticating": _YELLOW,
    "backoff": _YELLOW,
}


class Unreachable(Exception):
    """The keeper could not be asked, or what answered is not its status document (exit 2).

    The message is one line saying which, for stderr.
    """


@dataclass(frozen=True, slots=True)
class Target:
    """Where the document is fetched: ``http://host:port`` plus the path of ``/status``.

    ``host`` is bare (``::1``), as ``http.client`` takes it.
    """

    host: str
    port: int
    path: str = STATUS_PATH

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 host in brackets, as errors name it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"http://{self.address}{self.path}"


def parse_url(url: str) -> Target:
    """The ``Target`` of a ``--url``: a base URL (``http://127.0.0.1:9464``, or a prefix a proxy
    serves the endpoint under) to which ``/status`` is added, or the ``/status`` URL itself.

    Plain ``http://`` only, as ``probe``: the endpoint serves no TLS.

    Raises:
        ValueError: not such a URL; the message says what is wrong, for one stderr line.
    """
    if not _printable(url):  # first: urlsplit would misread an escape's "[" as IPv6
        raise ValueError("it holds control characters")
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        raise ValueError("expected an http:// URL such as http://127.0.0.1:9464")
    if not parts.hostname:
        raise ValueError("no host in it")
    try:
        port = parts.port  # raises ValueError when not a number or out of range
    except ValueError:
        raise ValueError("its port is not a number from 0 to 65535") from None
    if parts.query or parts.fragment:
        raise ValueError("a base URL has no query and no fragment")
    path = parts.path.rstrip("/")
    if not path.endswith(STATUS_PATH):
        path += STATUS_PATH
    return Target(parts.hostname, 80 if port is None else port, path)


def fetch(target: Target, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """``GET`` the status document and return its body as it came.

    ``timeout`` bounds the connect and each read, in seconds; the whole is not bounded, since a
    keeper sends its answer in one go and anything slower fails a read.

    Raises:
        Unreachable: no connection, no answer in time, not HTTP, or an answer other than 200.
    """
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    headers = {"Accept": "application/json", "User-Agent": f"deribit-keeper/{__version__}"}
    try:
        connection.request("GET", target.path, headers=headers)
        answer = connection.getresponse()
        body = answer.read(_BODY_MAX + 1)
    except ConnectionRefusedError:
        raise Unreachable(f"nothing listens at {target.address}: is the keeper running?") from None
    except TimeoutError:
        problem = f"no answer from {target.address} within {timeout:g}s"
        raise Unreachable(problem) from None
    except http.client.RemoteDisconnected:  # before HTTPException: it is one, and says more
        problem = f"what listens at {target.address} hung up without answering"
        raise Unreachable(problem) from None
    except http.client.HTTPException as error:
        problem = f"what answers at {target.address} does not speak HTTP ({type(error).__name__})"
        raise Unreachable(problem) from None
    except OSError as error:
        problem = f"cannot reach {target.address}: {error.strerror or type(error).__name__}"
        raise Unreachable(problem) from None
    finally:
        connection.close()
    if answer.status != 200:
        said = f"{answer.status} {answer.reason}".rstrip()
        raise Unreachable(f"{target} answered {said}: not a keeper's status endpoint")
    if len(body) > _BODY_MAX:
        raise Unreachable(f"{target} answered over {_BODY_MAX} bytes: not a keeper's status")
    return body


def parse_document(body: bytes, target: Target) -> dict[str, Any]:
    """The status document in ``body``, checked for the little this command relies on.

    Every account must be an object with a string ``state`` and a boolean ``ready``: that is
    what the exit code is made of. Anything else may be missing or odd (an older or newer
    keeper); ``render`` shows what it cannot read as ``?``.

    Raises:
        Unreachable: not JSON, or not shaped like a keeper's ``/status``.
    """
    try:
        document = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        raise Unreachable(f"{target} answered something that is not JSON") from None
    if not isinstance(document, dict) or not _accounts_readable(document.get("accounts")):
        raise Unreachable(f"{target} answered JSON that is not a keeper's status document")
    return document


def _accounts_readable(accounts: Any) -> bool:
    return isinstance(accounts, dict) and all(
        isinstance(a, dict) and isinstance(a.get("state"), str) and isinstance(a.get("ready"), bool)
        for a in accounts.values()
    )


def exit_code(document: Mapping[str, Any]) -> int:
    """0 when the keeper runs (is not stopping) and every account is ready, else 1.

    The same rule as ``/readyz``, so the command and a probe never disagree; a keeper with no
    account (an empty shard) is ready, as ``/readyz`` says too.
    """
    accounts = document["accounts"].values()
    ready = document.get("alive") is not False and all(a["ready"] for a in accounts)
    return EX_READY if ready else EX_NOT_READY


def render(document: Mapping[str, Any], *, now: float, colour: bool = False) -> list[str]:
    """The lines that show ``document``: a summary, a heading, then one row per account.

    Ages are measured against the keeper's own clock, the document's ``now``, so that a keeper
    whose host's clock differs from this one's still shows true ages; ``now`` (``time.time()``)
    stands in when the document has none (a keeper older than that key). Columns are aligned by
    display width (a wide character counts two); with ``colour`` the state word is coloured,
    after alignment, so colour never shifts a column.
    """
    now = _keeper_now(document, now)
    accounts: Mapping[str, Mapping[str, Any]] = document["accounts"]
    rows = [_COLUMNS, *(_row(name, account, now) for name, account in accounts.items())]
    widths = [max(_width(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [summary(document)]
    for number, row in enumerate(rows):
        cells = [
            _pad(cell, widths[i], right=_COLUMNS[i] in _RIGHT_ALIGNED) for i, cell in enumerate(row)
        ]
        if colour and number > 0:
            state = row[_STATE_COLUMN]
            tint = _STATE_COLOURS.get(state, _RED)
            cells[_STATE_COLUMN] = tint + state + _RESET + cells[_STATE_COLUMN][len(state) :]
        lines.append(_COLUMN_GAP.join(cells).rstrip())
    return lines


def summary(document: Mapping[str, Any]) -> str:
    """``deribit-keeper 1.2.0, up 3h12m, shard 1/4: 2/3 ready``: what a glance needs first.

    Uptime and shard are shown when the document has them (``uptime_s``; ``shard``, null for a
    keeper of every account), as the status page shows them; a stopping keeper says so, since it
    is about to close its links.
    """
    accounts = document["accounts"].values()
    version = document.get("version")
    parts = [f"deribit-keeper {clean(version) if isinstance(version, str) else _UNREADABLE}"]
    uptime = document.get("uptime_s")
    if uptime is not None:
        parts.append(f"up {human(uptime) if _is_number(uptime) else _UNREADABLE}")
    if "shard" in document:
        shard = document["shard"]
        parts.append(f"shard {'all' if shard is None else clean(str(shard))}")
    ready = sum(1 for a in accounts if a["ready"])
    line = ", ".join(parts) + f": {ready}/{len(accounts)} ready"
    return line + ("; stopping" if document.get("alive") is False else "")


def _row(name: str, account: Mapping[str, Any], now: float) -> tuple[str, ...]:
    cod = account.get("cod_confirmed_at")
    quiet = account.get("seconds_since_last_message")
    return (
        clean(name),
        clean(account["state"]),
        _NONE if cod is None else f"{_since(cod, now)} ago",
        _NONE if quiet is None else human(quiet) if _is_number(quiet) else _UNREADABLE,
        _count(account.get("reconnects")),
        _last_error(account.get("last_error"), now),
        _gateway(account.get("gateway")),
    )


def _last_error(error: Any, now: float) -> str:
    """``reason (4m05s ago)``; a long reason is cut, never the age after it."""
    if error is None:
        return _NONE
    if not isinstance(error, dict):
        return _UNREADABLE
    reason = error.get("reason")
    shown = clean(reason) if isinstance(reason, str) else _UNREADABLE
    if error.get("at") is None:
        return truncate(shown, ERROR_WIDTH)
    age = f" ({_since(error['at'], now)} ago)"
    return truncate(shown, ERROR_WIDTH - len(age)) + age


def _gateway(gateway: Any) -> str:
    """``3 links: engine, research``: how many local links, and whose (each client once);
    ``-`` without a gateway."""
    if gateway is None:
        return _NONE
    links = gateway.get("links") if isinstance(gateway, dict) else None
    if not isinstance(links, list):
        return _UNREADABLE
    if gateway.get("listening") is False:
        return "not listening"
    # A link that has not authenticated yet has no client id: counted, not named.
    clients = [link.get("client_id") for link in links if isinstance(link, dict)]
    named = [clean(c) if isinstance(c, str) else _UNREADABLE for c in clients if c is not None]
    named = list(dict.fromkeys(named))
    text = f"{len(links)} link{'' if len(links) == 1 else 's'}"
    return truncate(text + (": " + ", ".join(named) if named else ""), GATEWAY_WIDTH)


def _count(value: Any) -> str:
    if value is None:
        return _NONE
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else _UNREADABLE


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _since(moment: Any, now: float) -> str:
    """How long before ``now`` an ISO timestamp of the document was; ``?`` if it is not one.

    A moment after ``now`` (a clock stepped back) shows as no time at all.
    """
    then = _timestamp(moment)
    return _UNREADABLE if then is None else human(now - then)


def _keeper_now(document: Mapping[str, Any], fallback: float) -> float:
    keeper_now = _timestamp(document.get("now"))
    return fallback if keeper_now is None else keeper_now


def _timestamp(moment: Any) -> float | None:
    """Epoch seconds of one of the document's ISO timestamps; None if it is not one."""
    if not isinstance(moment, str):
        return None
    try:
        then = datetime.fromisoformat(moment)
    except ValueError:
        return None
    if then.tzinfo is None:
        return None  # the keeper writes UTC with a Z; a naive time could be any zone
    return then.timestamp()


def human(seconds: float) -> str:
    """A duration as an operator reads it: ``0.4s``, ``12s``, ``4m05s``, ``3h12m``, ``2d04h``.

    Tenths below ten seconds, where they matter (a link quiet for 0.2 s or for 9.8 s of a 10 s
    heartbeat); two units above a minute, always truncated, never rounded up. Negative is 0.
    """
    if seconds != seconds:  # NaN
        return _UNREADABLE
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        tenths = int(seconds * 10)
        return f"{tenths // 10}.{tenths % 10}s"
    whole = int(min(seconds, 1e15))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def clean(text: str) -> str:
    """``text`` with every character that could steer a terminal replaced by ``?``.

    That is every control and format character (ESC, CR, LF, TAB, C1 controls such as CSI,
    bidi overrides, zero-width characters) and the Unicode line and paragraph separators.
    """
    return "".join("?" if _steers(char) else char for char in text)


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` display columns, the last being an ellipsis when cut."""
    if _width(text) <= width:
        return text
    kept: list[str] = []
    used = 0
    for char in text:
        used += _char_width(char)
        if used > width - 1:
            break
        kept.append(char)
    return "".join(kept) + _ELLIPSIS


def use_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and not when ``NO_COLOR`` is set, to any value.

    no-color.org asks only a non-empty value to count; an empty one turns colour off here too,
    erring towards plain text. ``TERM=dumb`` says the terminal cannot show it.
    """
    if "NO_COLOR" in environ or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # not a real stream, or a closed one
        return False


def run(
    where: Target | str,
    *,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str],
) -> int:
    """The whole command: fetch, check, print, and return the exit code.

    ``where`` is the keeper's endpoint from the config, or a ``--url`` still to be parsed (a bad
    one is reported like an unreachable keeper: one line, exit 2). With ``as_json`` the document
    is printed as it came, byte for byte, once it has been checked to be one.
    """
    try:
        target = where if isinstance(where, Target) else _target_of_url(where)
        body = fetch(target, FETCH_TIMEOUT_S)  # read here, so a test can shorten it
        document = parse_document(body, target)
    except Unreachable as problem:
        _say(err, [f"deribit-keeper: status: {clean(str(problem))}"])
        return EX_UNREACHABLE
    if as_json:
        _say(out, [body.decode(errors="replace").rstrip("\n")])
    else:
        _say(out, render(document, now=time.time(), colour=use_colour(out, environ)))
    return exit_code(document)


def _target_of_url(url: str) -> Target:
    try:
        return parse_url(url)
    except ValueError as problem:
        raise Unreachable(f"--url {url!r}: {problem}") from None


def _say(stream: TextIO, lines: Iterable[str]) -> None:
    """Write ``lines``, whatever the stream's encoding: what it cannot encode becomes ``?``,
    rather than a UnicodeEncodeError traceback on a Latin-1 terminal."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    for line in lines:
        stream.write(line.encode(encoding, errors="replace").decode(encoding) + "\n")
    stream.flush()


def _steers(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] == "C" or category in ("Zl", "Zp")


def _printable(text: str) -> bool:
    return not any(_steers(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _pad(text: str, width: int, *, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


__all__ = [
    "EX_NOT_READY",
    "EX_READY",
    "EX_UNREACHABLE",
    "FETCH_TIMEOUT_S",
    "Target",
    "Unreachable",
    "clean",
    "exit_code",
    "fetch",
    "human",
    "parse_document",
    "parse_url",
    "render",
    "run",
    "summary",
    "truncate",
    "use_colour",
]
