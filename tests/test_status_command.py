"""``deribit-keeper status``: the table, the colour, the exit codes, and what it does with data it
cannot trust.

Three kinds of test. The formatting is pure, so most of it is tested on documents written here,
with a fixed clock. The command itself runs against a real Keeper on the simulator, in this
test's Trio loop: ``main`` runs in a worker thread, since its ``http.client`` blocks; those tests
run in real time (a thread's socket cannot follow a mock clock: the autojump would fire the
endpoint's own timeouts while a request is on its way) and wait on the keeper's events, never on
a fixed delay. What takes virtual minutes (reconnects and ages piling up) runs on the autojump
clock with the document fetched by the Trio-native ``http`` helper and rendered by the pure code.
Everything the command printed is handed to the suite's leak check.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import sys
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper import __version__, status_command
from deribit_keeper import http as http_routes
from deribit_keeper.cli import EX_CONFIG, main
from deribit_keeper.config import AccountConfig, HttpConfig, Secret
from deribit_keeper.session import Session, SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.status_command import (
    EX_NOT_READY,
    EX_READY,
    EX_UNREACHABLE,
    Target,
    Unreachable,
    clean,
    exit_code,
    human,
    parse_document,
    parse_url,
    render,
    truncate,
    use_colour,
)
from deribit_keeper.supervisor import Keeper

from .conftest import SIM_ACCOUNTS, Exposure, account_config, keeper_config
from .gateway_support import gateway_account, local_client, until
from .test_cancel_all import free_port
from .test_cli import write_config
from .test_http import http

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC).timestamp()
HEADINGS = ("ACCOUNT", "STATE", "COD CONFIRMED", "QUIET", "RECONNECTS", "LAST ERROR", "GATEWAY")
SGR = re.compile(r"\x1b\[[0-9;]*m")
SHOWN: list[str] = []  # what the command printed in the current test


@pytest.fixture(autouse=True)
def _output_is_searched(exposure: Exposure) -> Iterator[None]:
    """The command's output goes to the suite's leak check, as cancel-all's does."""
    SHOWN.clear()
    yield
    for text in SHOWN:
        exposure.show(text)


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own NO_COLOR or TERM must not decide a test; no secret is set either."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("MAIN_SECRET", raising=False)  # the command needs none


def ago(seconds: float) -> str:
    """The ISO timestamp the keeper would write ``seconds`` before NOW."""
    moment = datetime.fromtimestamp(NOW - seconds, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def account(**fields: Any) -> dict[str, Any]:
    """One account of a status document, ready unless told otherwise."""
    ready = {
        "state": "ready",
        "ready": True,
        "cod_scope": "connection",
        "cod_confirmed_at": ago(12.5),
        "connected_since": ago(3600),
        "seconds_since_last_message": 3.25,
        "reconnects": 0,
        "last_error": None,
        "gateway": None,
    }
    return {**ready, **fields}


def document(**accounts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "1.2.0",
        "alive": True,
        "ready": sum(a["ready"] for a in accounts.values()),
        "total": len(accounts),
        "accounts": accounts,
    }


def gateway(*client_ids: str | None, listening: bool = True) -> dict[str, Any]:
    links = [
        {"id": n, "client_id": c, "cod": False, "open_orders": 0} for n, c in enumerate(client_ids)
    ]
    return {"listen": "127.0.0.1:9601", "port": 9601, "listening": listening, "links": links}


SAMPLE = document(
    main=account(gateway=gateway("engine", "research", "engine")),
    hedge=account(
        state="backoff",
        ready=False,
        cod_confirmed_at=None,
        connected_since=None,
        seconds_since_last_message=None,
        reconnects=4,
        last_error={"reason": "rpc_error", "at": ago(245)},
    ),
    third=account(cod_confirmed_at=ago(0.4), seconds_since_last_message=0.08, reconnects=12),
)


# The formatting, on documents written here ---------------------------------------------------


def test_the_table_has_a_summary_a_heading_and_one_aligned_row_per_account() -> None:
    """The whole output of a mixed document, as an operator sees it (the README's sample)."""
    assert render({**SAMPLE, "uptime_s": 11545.2, "shard": "1/4"}, now=NOW) == [
        "deribit-keeper 1.2.0, up 3h12m, shard 1/4: 2/3 ready",
        "ACCOUNT  STATE    COD CONFIRMED  QUIET  RECONNECTS  LAST ERROR             GATEWAY",
        "main     ready          12s ago   3.2s           0  -                      "
        "3 links: engine, research",
        "hedge    backoff              -      -           4  rpc_error (4m05s ago)  -",
        "third    ready         0.4s ago   0.0s          12  -                      -",
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0.0s"),
        (0.08, "0.0s"),
        (3.25, "3.2s"),
        (9.99, "9.9s"),
        (10, "10s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (86400 * 2 + 3600 * 4 + 59, "2d04h"),
        (-5, "0.0s"),  # a clock stepped back
        (float("nan"), "?"),
        (float("inf"), "11574074074d01h"),  # JSON's Infinity: absurd, but a cell, not a crash
    ],
)
def test_durations_read_humanly_and_are_never_rounded_up(seconds: float, shown: str) -> None:
    """Tenths below 10 s, then two units; truncated, so 59.9 s is still '59s'."""
    assert human(seconds) == shown


def test_the_summary_shows_an_unsharded_keeper_and_one_that_is_stopping() -> None:
    """``shard: null`` is a keeper of every account; ``alive: false`` is said after the count."""
    stopping = {**document(main=account()), "alive": False, "shard": None, "uptime_s": 42}
    assert (
        render(stopping, now=NOW)[0]
        == "deribit-keeper 1.2.0, up 42s, shard all: 1/1 ready; stopping"
    )
    assert render(document(), now=NOW)[0] == "deribit-keeper 1.2.0: 0/0 ready"  # an older keeper


def test_ages_are_measured_on_the_keepers_clock_when_the_document_gives_it() -> None:
    """The document's ``now`` wins over this host's clock (here 100 s behind the keeper's), so
    a skew between the two hosts never shows as an age; without it, the local clock serves."""
    doc = document(main=account(cod_confirmed_at=ago(12.5)))
    assert "12s ago" in render({**doc, "now": ago(0)}, now=NOW - 100)[2]
    assert "1m52s ago" in render({**doc, "now": ago(-100)}, now=NOW)[2]
    assert "12s ago" in render(doc, now=NOW)[2]
    assert "12s ago" in render({**doc, "now": "not a time"}, now=NOW)[2]


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        (document(main=account(), hedge=account()), EX_READY),
        (document(main=account(), hedge=account(state="backoff", ready=False)), EX_NOT_READY),
        (document(main=account(state="enabling_cod", ready=False)), EX_NOT_READY),
        ({**document(main=account()), "alive": False}, EX_NOT_READY),
        (document(), EX_READY),  # an empty shard is ready, as /readyz says
    ],
)
def test_the_exit_code_follows_readyz(doc: dict[str, Any], code: int) -> None:
    """0 only when every account is ready and the keeper is not stopping."""
    assert exit_code(doc) == code


HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\r\nmain ready\u202e\u200b\u2028\x9b31m\t"


def test_control_characters_in_names_errors_and_client_ids_are_neutralised() -> None:
    """ESC, BEL, CR/LF, TAB, C1 CSI, bidi override, zero-width and line separators become '?':
    every row is still one line and nothing reaches the terminal that could steer it."""
    doc = document(
        **{
            HOSTILE: account(
                state="lost\x1b[32m",
                ready=False,
                last_error={"reason": HOSTILE, "at": ago(1)},
                gateway=gateway(HOSTILE),
            )
        }
    )
    lines = render({**doc, "version": "1\x1b[5m", "shard": HOSTILE}, now=NOW, colour=True)
    assert len(lines) == 3
    for line in lines:
        assert not any(steers(char) for char in SGR.sub("", line)), repr(line)
    assert lines[2].startswith("evil?[2J?]0;pwned???main ready")
    assert lines[2].count("\x1b") == 2  # only the command's own colour around the state word


def steers(char: str) -> bool:
    """A character that could move the cursor, end a line, recolour or reorder text."""
    return unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp")


def test_clean_replaces_each_steering_character_with_one_question_mark() -> None:
    """One for one, so the width of what is left still tells how much was there."""
    assert clean("a\x1bb\nc\u202ed\u00e9\u5f15") == "a?b?c?d\u00e9\u5f15"


def column(lines: list[str], heading: str) -> list[str]:
    """A left-aligned column's cells, by where its heading starts (lines as ``render`` makes)."""
    start = lines[1].index(heading)
    after = [lines[1].index(h) for h in HEADINGS if lines[1].index(h) > start]
    end = min(after, default=None)
    return [line[start:end].rstrip() for line in lines[2:]]


def test_a_long_last_error_is_cut_with_an_ellipsis_but_its_age_stays() -> None:
    """A reason past ERROR_WIDTH is cut; the '(… ago)' after it is always whole."""
    reason = "upstream_said_" + "x" * 200
    doc = document(
        main=account(state="lost", ready=False, last_error={"reason": reason, "at": ago(4000)})
    )
    lines = render(doc, now=NOW)
    row, cell = lines[2], column(lines, "LAST ERROR")[0]
    assert cell.endswith("\N{HORIZONTAL ELLIPSIS} (1h06m ago)")
    assert len(cell) == status_command.ERROR_WIDTH
    assert len(row) < 120


def test_a_long_gateway_cell_is_cut_too() -> None:
    """Forty local clients do not make a 400-column line."""
    doc = document(main=account(gateway=gateway(*(f"client-{n}" for n in range(40)))))
    [cell] = column(render(doc, now=NOW), "GATEWAY")
    assert cell.startswith("40 links: client-0, client-1")
    assert len(cell) == status_command.GATEWAY_WIDTH and cell.endswith("\N{HORIZONTAL ELLIPSIS}")


def test_truncate_counts_display_columns() -> None:
    """A wide (CJK) character takes two columns, in cutting as in aligning."""
    assert truncate("abcdef", 6) == "abcdef"
    assert truncate("abcdefg", 6) == "abcde\N{HORIZONTAL ELLIPSIS}"
    assert truncate("\u5f15\u64ce\u5f15\u64ce", 6) == "\u5f15\u64ce\N{HORIZONTAL ELLIPSIS}"


def test_columns_stay_aligned_with_wide_and_combining_characters() -> None:
    """Every cell after a wide or combining name starts in the same terminal column."""
    doc = document(**{"\u5f15\u64ce": account(), "e\u0301te": account(), "plain": account()})
    lines = render(doc, now=NOW)[1:]
    starts = {_display_column(line, "ready") for line in lines[1:]}
    assert starts == {_display_column(lines[0], "STATE")}


def _display_column(line: str, word: str) -> int:
    """The terminal column where ``word`` starts: wide characters take two, combining none."""
    before = line[: line.index(word)]
    wide = sum(unicodedata.east_asian_width(c) in ("W", "F") for c in before)
    return len(before) + wide - sum(bool(unicodedata.combining(c)) for c in before)


def test_colour_marks_the_state_word_only_and_never_shifts_a_column() -> None:
    """Green ready, yellow on its way or waiting, red for the rest; strip it and the lines are
    the plain ones."""
    states = [
        "ready",
        "connecting",
        "authenticating",
        "backoff",
        "enabling_cod",
        "lost",
        "stopped",
        "stopping",
        "new",
    ]
    doc = document(**{s: account(state=s, ready=s == "ready") for s in states})
    plain, coloured = render(doc, now=NOW), render(doc, now=NOW, colour=True)
    assert [SGR.sub("", line) for line in coloured] == plain
    assert coloured[:2] == plain[:2]  # the summary and the heading stay plain
    tints = {line.split()[0]: line.split()[1][:5] for line in coloured[2:]}
    assert tints == {
        "ready": "\x1b[32m",
        **{s: "\x1b[33m" for s in ("connecting", "authenticating", "backoff")},
        **{s: "\x1b[31m" for s in ("enabling_cod", "lost", "stopped", "stopping", "new")},
    }


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "environ", "expected"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, False),  # erring towards plain text
        (True, {"TERM": "dumb"}, False),
    ],
)
def test_colour_only_on_a_terminal_and_never_with_no_color(
    tty: bool, environ: dict[str, str], expected: bool
) -> None:
    """no-color.org's rule, and a dumb terminal."""
    assert use_colour(_Stream(tty), environ) is expected


@pytest.mark.parametrize(
    "odd",
    [
        {"reconnects": "many", "seconds_since_last_message": "soon", "cod_confirmed_at": 17},
        {"cod_confirmed_at": "yesterday", "last_error": "boom", "gateway": ["x"]},
        {"cod_confirmed_at": "2025-03-14T11:59:00", "last_error": {"reason": 5}},  # naive time
        {"seconds_since_last_message": float("nan"), "reconnects": True, "gateway": {"links": 3}},
        {"gateway": {"links": [None, {"client_id": 7}, {"client_id": None}]}},
    ],
)
def test_values_it_cannot_read_show_as_a_question_mark_not_a_traceback(odd: dict[str, Any]) -> None:
    """An older or newer keeper's document still makes a table; what is odd reads '?'."""
    lines = render({**document(main=account(**odd)), "uptime_s": "long"}, now=NOW)
    assert len(lines) == 3 and "?" in lines[2]


def test_links_not_yet_authenticated_are_counted_but_not_named() -> None:
    """A local link has no client id until it authenticates; a stopped gateway says so."""
    doc = document(
        main=account(gateway=gateway(None, "engine")),
        hedge=account(gateway=gateway(listening=False)),
    )
    rows = render(doc, now=NOW)[2:]
    assert rows[0].endswith("2 links: engine") and rows[1].endswith("not listening")


def test_the_route_asked_is_the_endpoints() -> None:
    """status_command keeps its own copy of the path, so as not to import the server."""
    assert status_command.STATUS_PATH == http_routes.STATUS_PATH


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:9464", Target("127.0.0.1", 9464)),
        ("http://127.0.0.1:9464/", Target("127.0.0.1", 9464)),
        ("http://127.0.0.1:9464/status", Target("127.0.0.1", 9464)),
        (" http://[::1]:9464 ", Target("::1", 9464)),
        ("http://keeper.internal", Target("keeper.internal", 80)),
        ("http://proxy:8080/keeper/", Target("proxy", 8080, "/keeper/status")),
    ],
)
def test_a_url_is_a_base_to_which_status_is_added(url: str, target: Target) -> None:
    """A base URL, a proxy's prefix, or the /status URL itself."""
    assert parse_url(url) == target


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:9464", "expected an http:// URL"),
        ("https://127.0.0.1:9464", "expected an http:// URL"),
        ("ftp://127.0.0.1", "expected an http:// URL"),
        ("http://", "no host"),
        ("http://127.0.0.1:99999", "port is not a number"),
        ("http://127.0.0.1:port", "port is not a number"),
        ("http://127.0.0.1:9464/?x=1", "no query"),
        ("http://127.0.0.1:9464/\x1b[31m", "control characters"),
    ],
)
def test_a_malformed_url_is_refused_with_what_is_wrong(url: str, problem: str) -> None:
    """Each refusal names the one thing wrong, for a one-line error."""
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_url(url)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>hello</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a keeper's status document"),
        (b'{"status": "ok"}', "not a keeper's status document"),
        (b'{"accounts": {"main": {"state": "ready"}}}', "not a keeper's status document"),
        (b'{"accounts": {"main": {"state": 1, "ready": true}}}', "not a keeper's status document"),
        (b'{"accounts": {"main": {"state": "ready", "ready": "yes"}}}', "not a keeper's status"),
    ],
)
def test_an_answer_that_is_not_a_status_document_is_refused(body: bytes, problem: str) -> None:
    """What the exit code is made of must be there, as it should be."""
    with pytest.raises(Unreachable, match=problem):
        parse_document(body, Target("127.0.0.1", 1))


# The command, against a real keeper (real time) ----------------------------------------------


def endpoint_keeper(*accounts: AccountConfig, **kwargs: Any) -> Keeper:
    """A Keeper for ``accounts`` with its operations endpoint on a free loopback port."""
    config = dataclasses.replace(keeper_config(*accounts), http=HttpConfig("127.0.0.1", 0))
    return Keeper(config, rng=random.Random(5), environ={}, **kwargs)


async def start(nursery: trio.Nursery, keeper: Keeper) -> int:
    """Run ``keeper``; its endpoint's port once it listens and every session has settled:
    ready, or failed at least once."""
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(
        keeper,
        lambda: keeper.http_port is not None and all(map(_settled, keeper.sessions.values())),
    )
    assert keeper.http_port is not None
    return keeper.http_port


def _settled(session: Session) -> bool:
    return bool(session.state is SessionState.READY or session.last_error is not None)


async def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``deribit-keeper status ARGS`` in a worker thread (its http.client blocks): exit code,
    stdout, stderr."""
    with trio.fail_after(10):
        code = await trio.to_thread.run_sync(main, ["status", *args])
    out, err = capsys.readouterr()
    SHOWN.extend([out, err])
    return code, out, err


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def operator_config(tmp_path: Path, listen: str | None) -> Path:
    """The operator's config file: the service's accounts, with ``http.listen`` if given."""
    extra = "" if listen is None else f'http: {{listen: "{listen}"}}\n'
    return write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2", extra=extra)


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows by account name, split into words."""
    return {line.split()[0]: line.split() for line in out.splitlines()[2:]}


async def test_every_account_ready_exits_0_with_the_endpoint_from_the_config(
    nursery: trio.Nursery, sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config: http.listen (0.0.0.0 reached on loopback, no secret resolved); both rows ready."""
    keeper = endpoint_keeper(account_config(sim, "main"), account_config(sim, "hedge"))
    port = await start(nursery, keeper)
    config = operator_config(tmp_path, f"0.0.0.0:{port}")
    code, out, err = await status(capsys, "--config", str(config))
    assert (code, err) == (EX_READY, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"deribit-keeper {__version__}") and lines[0].endswith(": 2/2 ready")
    assert lines[1].split()[:2] == ["ACCOUNT", "STATE"]
    assert {name: row[1] for name, row in rows(out).items()} == {"main": "ready", "hedge": "ready"}
    assert "\x1b" not in out  # captured output is no terminal


async def test_the_default_config_path_is_the_environments(
    nursery: trio.Nursery,
    sim: Simulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither --config nor --url: $DERIBIT_KEEPER_CONFIG, as every other command."""
    port = await start(nursery, endpoint_keeper(account_config(sim, "main")))
    monkeypatch.setenv("DERIBIT_KEEPER_CONFIG", str(operator_config(tmp_path, f"127.0.0.1:{port}")))
    code, out, _ = await status(capsys)
    assert code == EX_READY and rows(out)["main"][1] == "ready"


@pytest.mark.parametrize("suffix", ["", "/", "/status"])
async def test_url_reaches_the_keeper_without_a_config(
    nursery: trio.Nursery, sim: Simulator, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    """--url with a base URL, with a slash, or the /status URL itself."""
    port = await start(nursery, endpoint_keeper(account_config(sim, "main")))
    code, out, err = await status(capsys, "--url", url_of(port) + suffix)
    assert (code, err) == (EX_READY, "")
    assert rows(out)["main"][1] == "ready"


async def test_json_prints_the_document_exactly_as_the_keeper_served_it(
    nursery: trio.Nursery, sim: Simulator, capsys: pytest.CaptureFixture[str], exposure: Exposure
) -> None:
    """--json: byte for byte the body the endpoint sent, parseable, and /status's shape."""
    keeper = endpoint_keeper(account_config(sim, "main"), account_config(sim, "hedge"))
    port = await start(nursery, keeper)
    code, out, err = await status(capsys, "--url", url_of(port), "--json")
    assert (code, err) == (EX_READY, "")
    [served] = [text for text in exposure.served if text.startswith('{"version"')]
    assert out == served
    printed = json.loads(out)
    again = (await http(port, "/status")).json()
    for doc in (printed, again):  # what moves between two reads
        doc.pop("now", None)
        doc.pop("uptime_s", None)
        for each in doc["accounts"].values():
            each.pop("seconds_since_last_message")
    assert printed == again
    assert set(printed["accounts"]) == {"main", "hedge"}


@pytest.mark.parametrize("as_json", [False, True])
async def test_an_account_that_cannot_authenticate_exits_1(
    nursery: trio.Nursery, sim: Simulator, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    """A wrong secret: that row is not ready and says why; the other is; exit 1, with --json
    too."""
    wrong = account_config(sim, "main", client_secret=Secret("not-the-secret"))
    port = await start(nursery, endpoint_keeper(wrong, account_config(sim, "hedge")))
    code, out, err = await status(capsys, "--url", url_of(port), *(["--json"] if as_json else []))
    assert (code, err) == (EX_NOT_READY, "")
    if as_json:
        assert json.loads(out)["accounts"]["main"]["ready"] is False
        return
    assert out.splitlines()[0].endswith(": 1/2 ready")
    main_row, hedge_row = rows(out)["main"], rows(out)["hedge"]
    assert main_row[1] in ("connecting", "authenticating", "backoff")
    assert "ago)" in out.splitlines()[2] and hedge_row[1] == "ready"


async def test_a_stopped_simulator_makes_every_account_not_ready_and_exits_1(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deribit gone: the keeper still answers, with no account ready: exit 1, not 2."""
    sim = Simulator(list(SIM_ACCOUNTS))
    with trio.CancelScope() as simulator:
        async with trio.open_nursery() as serving:
            await serving.start(sim.serve, 0)
            keeper = endpoint_keeper(account_config(sim, "main"), account_config(sim, "hedge"))
            port = await start(nursery, keeper)
            simulator.cancel()
    await until(keeper, lambda: not any(s.ready for s in keeper.sessions.values()))
    code, out, _ = await status(capsys, "--url", url_of(port))
    assert code == EX_NOT_READY
    assert out.splitlines()[0].endswith(": 0/2 ready")
    assert all(row[1] != "ready" for row in rows(out).values())


async def test_a_hostile_account_name_reaches_the_terminal_neutralised(
    nursery: trio.Nursery, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name the config would refuse, put in by hand: /status carries it (JSON-escaped), the
    table shows it as one harmless line."""
    evil = dataclasses.replace(account_config(sim, "main"), name="main\x1b[2J\r\nfake ready")
    port = await start(nursery, endpoint_keeper(evil))
    code, out, _ = await status(capsys, "--url", url_of(port))
    assert code == EX_READY
    assert "\x1b" not in out and "\r" not in out
    assert out.splitlines()[2].startswith("main?[2J??fake ready  ready")
    assert len(out.splitlines()) == 3


@pytest.mark.parametrize("how", ["--url", "--config"])
async def test_nothing_listening_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """No keeper: one stderr line asking whether it runs, nothing on stdout, no traceback."""
    port = free_port()
    where = url_of(port) if how == "--url" else str(operator_config(tmp_path, f"127.0.0.1:{port}"))
    code, out, err = await status(capsys, how, where)
    assert (code, out) == (EX_UNREACHABLE, "")
    assert (
        err
        == f"deribit-keeper: status: nothing listens at 127.0.0.1:{port}: is the keeper running?\n"
    )


async def test_a_keeper_that_does_not_answer_exits_2_within_the_timeout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that accepts and never answers (a hung process): exit 2 once the timeout
    passes, said so."""
    monkeypatch.setattr(status_command, "FETCH_TIMEOUT_S", 0.2)
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel completes the handshake; nobody answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        code, out, err = await status(capsys, "--url", url_of(port))
        assert time.monotonic() - started < 3
    assert (code, out) == (EX_UNREACHABLE, "")
    assert err == f"deribit-keeper: status: no answer from 127.0.0.1:{port} within 0.2s\n"


ANSWERS = {
    "html": (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html></html>", "is not JSON"),
    "json": (b'HTTP/1.1 200 OK\r\n\r\n{"status": "ok"}', "JSON that is not a keeper's status"),
    "404": (b"HTTP/1.1 404 Not Found\r\n\r\n{}", "answered 404 Not Found: not a keeper's status"),
    "ssh": (b"SSH-2.0-OpenSSH_9.2\r\n", "does not speak HTTP (BadStatusLine)"),
    "hangup": (b"", "hung up without answering"),
}


@pytest.mark.parametrize("answer", list(ANSWERS))
async def test_something_else_answering_exits_2_saying_what_it_is_not(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], answer: str
) -> None:
    """The wrong port (a web page, another JSON service, a 404, SSH, a hang-up): one line, 2."""
    raw, problem = ANSWERS[answer]

    async def other_server(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(raw)
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, other_server, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    code, out, err = await status(capsys, "--url", url_of(port))
    assert (code, out) == (EX_UNREACHABLE, "")
    [line] = err.splitlines()
    assert line.startswith("deribit-keeper: status: ") and problem in line
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:9464", "expected an http:// URL"),
        ("http://127.0.0.1:99999", "port is not a number"),
        ("http://host\x1b[31m.example", "control characters"),
    ],
)
async def test_a_bad_url_exits_2_with_one_clean_line(
    capsys: pytest.CaptureFixture[str], url: str, problem: str
) -> None:
    """Reported like an unreachable keeper (exit 2), quoting the URL harmlessly."""
    code, out, err = await status(capsys, "--url", url)
    assert (code, out) == (EX_UNREACHABLE, "")
    [line] = err.splitlines()
    assert line.startswith("deribit-keeper: status: --url ") and problem in line
    assert "\x1b" not in err


def test_url_and_config_together_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They say the same thing two ways: argparse refuses, exit 2, before anything is sent."""
    with pytest.raises(SystemExit) as stopped:
        main(["status", "--url", "http://127.0.0.1:1", "--config", str(tmp_path / "x.yaml")])
    assert stopped.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "problem"),
    [(None, "http.listen: not set"), ("127.0.0.1:0", "http.listen: port 0 is any free port")],
)
def test_a_config_without_a_known_endpoint_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str | None, problem: str
) -> None:
    """No endpoint to ask is a config problem, as for cancel-all: one line naming the key."""
    path = operator_config(tmp_path, listen)
    assert main(["status", "--config", str(path)]) == EX_CONFIG
    [line] = capsys.readouterr().err.splitlines()
    assert f"{path}: {problem}" in line and "--url" in line


# Colour on a real terminal -------------------------------------------------------------------


def read_pty(master: int) -> str:
    """What has been written to the pty so far (the terminal turns each newline into CRLF)."""
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def on_terminal(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """``main(["status", *args])`` with stdout a real pty: its exit code, and what it showed."""
    master, slave = os.openpty()
    try:
        with open(slave, "w", encoding="utf-8") as terminal, monkeypatch.context() as patched:
            patched.setattr(sys, "stdout", terminal)
            code = main(["status", *args])
        return code, read_pty(master)
    finally:
        os.close(master)


@pytest.mark.parametrize("no_color", [None, "", "1"])
async def test_on_a_terminal_the_state_is_coloured_unless_no_color_is_set(
    nursery: trio.Nursery, sim: Simulator, monkeypatch: pytest.MonkeyPatch, no_color: str | None
) -> None:
    """stdout a real pty: green 'ready', aligned as without; NO_COLOR, any value, keeps it plain."""
    if no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)
    port = await start(nursery, endpoint_keeper(account_config(sim, "main")))
    with trio.fail_after(10):
        code, shown = await trio.to_thread.run_sync(on_terminal, monkeypatch, "--url", url_of(port))
    SHOWN.append(shown)
    assert code == EX_READY
    heading, row = shown.splitlines()[1:3]
    if no_color is None:
        assert row.startswith("main     \x1b[32mready\x1b[0m")
        assert heading.index("STATE") == SGR.sub("", row).index("ready")
    else:
        assert "\x1b" not in shown


async def test_the_real_command_colours_its_terminal(nursery: trio.Nursery, sim: Simulator) -> None:
    """``python -m deribit_keeper status`` as a process whose stdout is a pty: coloured, exit 0.
    (Its plain output to a pipe is what every in-process test here reads.)"""
    port = await start(nursery, endpoint_keeper(account_config(sim, "main")))
    command = [sys.executable, "-m", "deribit_keeper", "status", "--url", url_of(port)]
    master, slave = os.openpty()
    try:
        with trio.fail_after(30):
            done = await trio.run_process(command, stdout=slave, check=False)
        os.close(slave)
        slave = -1
        shown = read_pty(master)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    SHOWN.append(shown)
    assert done.returncode == EX_READY
    assert "\x1b[32mready\x1b[0m" in shown.splitlines()[2]


# Ages that take virtual minutes (autojump clock) ---------------------------------------------


async def test_reconnects_and_ages_over_virtual_minutes_read_as_the_document_says(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Five virtual minutes of a wrong secret beside a ready account with a gateway link: the
    rendered rows agree with the document the real endpoint served, ages measured on the
    keeper's own clock."""
    epoch = time.time() - trio.current_time()  # the keeper's wall clock moves with Trio's

    def wall() -> float:
        return epoch + trio.current_time()

    sim = Simulator(list(SIM_ACCOUNTS), wall_clock=wall)
    await nursery.start(sim.serve, 0)
    wrong = account_config(sim, "main", client_secret=Secret("not-the-secret"))
    keeper = endpoint_keeper(wrong, gateway_account(sim, "hedge"), wall_clock=wall)
    port = await start(nursery, keeper)
    await until(keeper, lambda: all(g.port is not None for g in keeper.gateways.values()))
    async with local_client(keeper.gateways["hedge"]) as engine:
        await engine.auth()
        await trio.sleep(300)
        doc = parse_document((await http(port, "/status")).body, Target("127.0.0.1", port))
        lines = render(doc, now=wall())
    SHOWN.extend(lines)
    assert exit_code(doc) == EX_NOT_READY
    assert lines[0].endswith(": 1/2 ready")
    main_doc, hedge_doc = doc["accounts"]["main"], doc["accounts"]["hedge"]
    main_row, hedge_row = rows("\n".join(lines))["main"], rows("\n".join(lines))["hedge"]
    assert main_doc["reconnects"] >= 3 and main_row[4] == str(main_doc["reconnects"])
    error_at = datetime.fromisoformat(main_doc["last_error"]["at"]).timestamp()
    assert column(lines, "LAST ERROR")[0].endswith(f"({human(wall() - error_at)} ago)")
    assert main_doc["cod_confirmed_at"] is None and main_row[2] == "-"
    confirmed = datetime.fromisoformat(hedge_doc["cod_confirmed_at"]).timestamp()
    # Set at connect, token refresh and COD repair (not by the guard's routine reads): 300 s.
    assert hedge_row[1:3] == ["ready", human(wall() - confirmed)] == ["ready", "5m00s"]
    assert hedge_row[4] == human(hedge_doc["seconds_since_last_message"])
    assert lines[3].endswith("1 link: engine")
