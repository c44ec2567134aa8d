"""The panic button: ``POST /accounts/<name>/cancel-all`` and ``deribit-keeper cancel-all``.

A running Keeper with its operations endpoint, on the simulator, with real open orders placed by a
second client of the same account (cancel_all cancels the account's orders whatever link made
them). The endpoint tests run on the autojump clock; the CLI's real-process tests run in real
time, as a subprocess cannot follow a mock clock. The suite's leak check (conftest's
``Exposure``) also looks for this module's admin token, in the CLI's output too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper import cli
from deribit_keeper.cli import EX_CONFIG, EX_SOFTWARE, main
from deribit_keeper.config import AccountConfig, HttpConfig, Secret
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import SIM_ACCOUNTS, Exposure, LogLines, account_config, keeper_config
from .gateway_support import ready_and_listening, until, upstream
from .test_cli import write_config
from .test_http import Reply, http
from .test_simulator import Client, connect
from .test_simulator_exchange import ETH, limit

ADMIN_TOKEN = "admin-TOKEN-do-not-log-4f1c9e"
MAIN, HEDGE = SIM_ACCOUNTS[0], SIM_ACCOUNTS[1]
SHOWN: list[str] = []  # what the CLI printed in the current test


@pytest.fixture(autouse=True)
def _admin_token_never_shown(exposure: Exposure) -> Iterator[None]:
    """Make the admin token a secret to the suite's leak check, and the CLI's output something
    it searches. The check already sees logs and every answer the keeper served, and knows the
    token of each Keeper built here; not the one a CLI test's own process reads from a file."""
    exposure.secrets.add(ADMIN_TOKEN)
    SHOWN.clear()
    yield
    for text in SHOWN:  # handed over before the check runs: it tears down after this fixture
        exposure.show(text)


def admin_keeper(*accounts: AccountConfig, token: str | None = ADMIN_TOKEN) -> Keeper:
    """A Keeper for ``accounts`` with its endpoint on a free port and ``token`` as admin token."""
    http_config = HttpConfig("127.0.0.1", 0, None if token is None else Secret(token))
    config = dataclasses.replace(keeper_config(*accounts), http=http_config)
    return Keeper(config, rng=random.Random(3), environ={})


async def run_admin_keeper(
    nursery: trio.Nursery,
    sim: Simulator,
    *names: str,
    token: str | None = ADMIN_TOKEN,
    **overrides: Any,
) -> Keeper:
    """A running ``admin_keeper`` of SIM_ACCOUNTS ``names``, once every session is ready."""
    keeper = admin_keeper(*(account_config(sim, n, **overrides) for n in names), token=token)
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(keeper, ready_and_listening(keeper))
    return keeper


async def cancel_all(
    keeper: Keeper,
    name: str = "main",
    *,
    token: str | None = ADMIN_TOKEN,
    method: str = "POST",
    headers: str = "",
) -> Reply:
    """One request to the cancel-all route (the leak check sees the answer as served)."""
    assert keeper.http_port is not None
    auth = "" if token is None else f"Authorization: Bearer {token}\r\n"
    send = f"Connection: close\r\nContent-Length: 0\r\n{auth}{headers}"
    return await http(keeper.http_port, f"/accounts/{name}/cancel-all", method, send)


@asynccontextmanager
async def trader(sim: Simulator, account: str = "main") -> AsyncIterator[Client]:
    """An authenticated client of ``account`` on the simulator itself, as a trading engine."""
    secret = next(a.client_secret for a in SIM_ACCOUNTS if a.name == account)
    async with connect(sim) as client:
        await client.auth(f"{account}-id", secret)
        yield client


async def place(client: Client, *prices: float) -> None:
    for price in prices:
        await client.result("private/buy", limit(price))


def cancel_all_calls(sim: Simulator) -> int:
    """How many private/cancel_all requests reached the simulator, on any connection."""
    return sum(c.methods().count("private/cancel_all") for c in sim.connections)


async def test_cancel_all_cancels_every_open_order_of_the_account_and_returns_the_count(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """200 {"account", "cancelled"}; the account's orders are gone, another account's stay."""
    keeper = await run_admin_keeper(nursery, sim, "main", "hedge")
    async with trader(sim) as main, trader(sim, "hedge") as hedge:
        await place(main, 49000, 48000)
        await main.result("private/sell", limit(3100, instrument=ETH))
        await place(hedge, 47000)
        reply = await cancel_all(keeper)
        assert reply.status == 200
        assert reply.json() == {"account": "main", "cancelled": 3}
        assert sim.open_orders(MAIN.client_id) == []
        assert len(sim.open_orders(HEDGE.client_id)) == 1
    assert "private/cancel_all" in upstream(sim).methods()  # over the keeper's own link
    [event] = log_lines.events("keeper.cancel_all")
    assert event["level"] == "warning"
    assert (event["account"], event["cancelled"], event["source"]) == ("main", 3, "http")


@pytest.mark.parametrize(
    ("header", "source"),
    [
        ("X-Deribit-Keeper-Source: cli\r\n", "cli"),
        ("X-Deribit-Keeper-Source: engine\r\n", "http"),
        ("", "http"),
    ],
)
async def test_the_logged_source_is_cli_only_when_the_request_says_so(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    header: str,
    source: str,
) -> None:
    """The CLI's header makes ``source: cli``; anything else is ``http``; none open: 0."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    reply = await cancel_all(keeper, headers=header)
    assert reply.json() == {"account": "main", "cancelled": 0}
    [event] = log_lines.events("keeper.cancel_all")
    assert event["source"] == source


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no_token"),
        ("", "no_token"),
        ("wrong-token", "wrong_token"),
        (ADMIN_TOKEN[:-1], "wrong_token"),
        (ADMIN_TOKEN + "x", "wrong_token"),
    ],
)
async def test_without_the_admin_token_it_is_refused_with_401_and_nothing_is_sent(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    token: str | None,
    reason: str,
) -> None:
    """No header, or a wrong token: 401 with a Bearer challenge; Deribit sees nothing."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    async with trader(sim) as main:
        await place(main, 49000)
        reply = await cancel_all(keeper, token=token)
        assert reply.status == 401
        assert reply.headers["www-authenticate"].startswith('Bearer realm="deribit-keeper"')
        assert reply.json()["error"] == "unauthorized"
        assert len(sim.open_orders(MAIN.client_id)) == 1
    assert cancel_all_calls(sim) == 0
    [refused] = log_lines.events("keeper.cancel_all_refused")
    assert (refused["level"], refused["reason"], refused["account"]) == ("warning", reason, "main")
    assert refused["client"] == "127.0.0.1"
    assert not log_lines.events("keeper.cancel_all")


async def test_another_scheme_with_the_right_token_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Only ``Authorization: Bearer`` carries the token: Basic or a bare token is 401."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    for value in (f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN):
        reply = await cancel_all(keeper, token=None, headers=f"Authorization: {value}\r\n")
        assert reply.status == 401
    assert cancel_all_calls(sim) == 0


async def test_without_a_configured_admin_token_every_request_is_refused(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """No http.admin_token_file: the route is disabled, whatever token is presented."""
    keeper = await run_admin_keeper(nursery, sim, "main", token=None)
    reply = await cancel_all(keeper)
    assert reply.status == 401
    assert "admin_token_file" in reply.json()["detail"]
    assert cancel_all_calls(sim) == 0
    [refused] = log_lines.events("keeper.cancel_all_refused")
    assert refused["reason"] == "admin_token_not_configured"


async def test_an_unknown_account_is_401_without_the_token_and_404_with_it(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Authentication comes first, so only a token holder learns which accounts exist."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    assert (await cancel_all(keeper, "nope", token="guess")).status == 401
    reply = await cancel_all(keeper, "nope")
    assert reply.status == 404
    assert reply.json()["error"] == "unknown account" and reply.json()["account"] == "nope"
    assert cancel_all_calls(sim) == 0
    [failed] = log_lines.events("keeper.cancel_all_failed")
    assert (failed["status"], failed["account"], failed["source"]) == (404, "nope", "http")


async def test_an_account_not_ready_is_503_and_nothing_is_sent(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A session that cannot authenticate is never ready: 503 naming its state, nothing sent."""
    keeper = admin_keeper(
        account_config(sim, "main", client_secret=Secret("not-the-secret")),
        account_config(sim, "hedge"),
    )
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(keeper, lambda: keeper.sessions["hedge"].ready and keeper.http_port is not None)
    reply = await cancel_all(keeper, "main")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "account not ready" and body["account"] == "main"
    assert body["state"] == keeper.sessions["main"].state.value != "ready"
    assert "nothing was sent" in body["detail"]
    assert cancel_all_calls(sim) == 0
    [failed] = log_lines.events("keeper.cancel_all_failed")
    assert (failed["status"], failed["level"]) == (503, "warning")


async def test_a_refusal_by_deribit_is_502_with_its_code_and_message(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Deribit's error object comes back as 502 with its code and message; orders stay open."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    async with trader(sim) as main:
        await place(main, 49000)
        sim.fail_next("private/cancel_all", ErrorCode.FORBIDDEN)
        reply = await cancel_all(keeper)
        assert reply.status == 502
        body = reply.json()
        assert (body["error"], body["code"], body["message"]) == (
            "deribit refused",
            13021,
            "forbidden",
        )
        assert len(sim.open_orders(MAIN.client_id)) == 1
    [failed] = log_lines.events("keeper.cancel_all_failed")
    assert (failed["status"], failed["level"], failed["code"]) == (502, "error", 13021)
    assert not log_lines.events("keeper.cancel_all")


async def test_no_answer_from_deribit_is_504_and_says_the_outcome_is_unknown(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """An answer later than the request timeout: 504, reason request_timeout."""
    keeper = await run_admin_keeper(nursery, sim, "main", request_timeout=2.0)
    sim.delay_next("private/cancel_all", 60)
    reply = await cancel_all(keeper)
    assert reply.status == 504
    body = reply.json()
    assert body["reason"] == "request_timeout" and "outcome unknown" in body["detail"]


async def test_a_link_that_ends_before_the_answer_is_502_with_its_reason(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Sent, then the link died: 502, reason connection_closed, outcome unknown."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    sim.delay_next("private/cancel_all", 60)
    link = upstream(sim)
    replies: list[Reply] = []

    async def ask() -> None:
        replies.append(await cancel_all(keeper))

    async with trio.open_nursery() as inner:
        inner.start_soon(ask)
        await sim.wait_for(lambda: "private/cancel_all" in link.methods())
        await sim.drop(link, abrupt=True)
    [reply] = replies
    assert reply.status == 502
    assert reply.json()["reason"] == "connection_closed"


async def test_a_reloaded_admin_token_takes_effect_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """The token is read from the keeper's current config: after a reload only the new one works,
    as the CLI reads the file afresh each time; the session is untouched."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    session = keeper.sessions["main"]
    assert keeper.config.http is not None
    rotated = dataclasses.replace(keeper.config.http, admin_token=Secret(ADMIN_TOKEN + "-2"))
    keeper.reload(dataclasses.replace(keeper.config, http=rotated))
    assert (await cancel_all(keeper)).status == 401
    assert (await cancel_all(keeper, token=ADMIN_TOKEN + "-2")).status == 200
    assert keeper.sessions["main"] is session


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_only_post_is_allowed_on_the_route(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, method: str
) -> None:
    """Any other method: 405 with ``Allow: POST``, for any name and before authentication."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    for name in ("main", "nope"):
        reply = await cancel_all(keeper, name, method=method, token=None)
        assert reply.status == 405
        assert reply.headers["allow"] == "POST"
    assert cancel_all_calls(sim) == 0


async def test_post_on_the_read_only_routes_is_still_405_and_other_account_paths_404(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """The GET routes keep ``Allow: GET, HEAD``; /accounts/... is only the cancel-all route."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    assert keeper.http_port is not None
    auth = f"Connection: close\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
    status = await http(keeper.http_port, "/status", "POST", auth)
    assert (status.status, status.headers["allow"]) == (405, "GET, HEAD")
    for path in ("/accounts/main", "/accounts//cancel-all", "/accounts/a/b/cancel-all"):
        assert (await http(keeper.http_port, path, "POST", auth)).status == 404
    assert cancel_all_calls(sim) == 0


# The command --------------------------------------------------------------------------------


def cli_config(tmp_path: Path, keeper: Keeper | None, *, listen: str = "", token: str = "") -> Path:
    """A config file as the operator's, pointing at ``keeper``'s endpoint with the admin token."""
    listen = listen or f"127.0.0.1:{keeper.http_port if keeper else free_port()}"
    (tmp_path / "admin.token").write_text((token or ADMIN_TOKEN) + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    extra = f'http:\n  listen: "{listen}"\n  admin_token_file: admin.token\n'
    return write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2", extra=extra)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m deribit_keeper cancel-all ...`` as a real process, in real time."""
    env = {**os.environ, "MAIN_SECRET": MAIN.client_secret}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "deribit_keeper", "cancel-all", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    SHOWN.extend([done.stdout.decode(), done.stderr.decode()])
    return done


async def test_the_command_cancels_through_the_running_keeper_and_prints_the_json(
    nursery: trio.Nursery, sim: Simulator, tmp_path: Path, log_lines: LogLines
) -> None:
    """A real process: exit 0, the JSON answer on stdout, logged with ``source: cli``."""
    keeper = await run_admin_keeper(nursery, sim, "main", "hedge")
    path = cli_config(tmp_path, keeper)
    async with trader(sim) as main:
        await place(main, 49000, 48500)
        done = await run_cli("main", "--config", str(path))
        assert (done.returncode, done.stderr) == (0, b"")
        assert json.loads(done.stdout) == {"account": "main", "cancelled": 2}
        assert sim.open_orders(MAIN.client_id) == []
    [event] = log_lines.events("keeper.cancel_all")
    assert (event["account"], event["cancelled"], event["source"]) == ("main", 2, "cli")


@pytest.mark.parametrize(
    ("account", "token", "expected"),
    [
        ("nope", "", "cancel-all nope: 404 unknown account"),
        ("main", "an-old-token", "cancel-all main: 401 unauthorized"),
    ],
)
async def test_the_command_reports_a_refusal_in_one_line_and_exits_1(
    nursery: trio.Nursery,
    sim: Simulator,
    tmp_path: Path,
    account: str,
    token: str,
    expected: str,
) -> None:
    """404 and 401 from the keeper: one stderr line naming the status, nothing on stdout."""
    keeper = await run_admin_keeper(nursery, sim, "main")
    done = await run_cli(account, "--config", str(cli_config(tmp_path, keeper, token=token)))
    assert done.returncode == EX_SOFTWARE and done.stdout == b""
    [line] = done.stderr.decode().splitlines()
    assert line.startswith(f"deribit-keeper: {expected}")
    assert cancel_all_calls(sim) == 0


def test_the_command_without_an_http_section_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without http.listen there is no keeper endpoint to ask: a config error, exit 78."""
    monkeypatch.setenv("MAIN_SECRET", MAIN.client_secret)
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    assert main(["cancel-all", "main", "--config", str(path)]) == EX_CONFIG
    [line] = capsys.readouterr().err.splitlines()
    assert f"{path}: http.listen: not set" in line


def test_the_command_without_an_admin_token_file_exits_78_before_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """http.listen but no admin_token_file: a config error naming the key, nothing sent."""
    monkeypatch.setenv("MAIN_SECRET", MAIN.client_secret)
    with socket.socket() as listener:  # would see a connection if one were made
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        extra = f'http:\n  listen: "127.0.0.1:{port}"\n'
        path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2", extra=extra)
        assert main(["cancel-all", "main", "--config", str(path)]) == EX_CONFIG
        with pytest.raises(BlockingIOError):
            listener.accept()
    [line] = capsys.readouterr().err.splitlines()
    assert f"{path}: http.admin_token_file: not set" in line


def test_the_command_refuses_an_endpoint_on_port_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listen: 0`` picks a port at start-up the command cannot know: exit 78, said so."""
    monkeypatch.setenv("MAIN_SECRET", MAIN.client_secret)
    path = cli_config(tmp_path, None, listen="127.0.0.1:0")
    assert main(["cancel-all", "main", "--config", str(path)]) == EX_CONFIG
    assert "port 0" in capsys.readouterr().err


def test_the_command_with_no_keeper_running_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at http.listen: one line asking whether the keeper runs, exit 1."""
    monkeypatch.setenv("MAIN_SECRET", MAIN.client_secret)
    port = free_port()
    path = cli_config(tmp_path, None, listen=f"0.0.0.0:{port}")  # reached on loopback
    assert main(["cancel-all", "main", "--config", str(path)]) == EX_SOFTWARE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"deribit-keeper: cancel-all main: nothing listens at 127.0.0.1:{port}: "
        "is the keeper running?"
    )
    SHOWN.append(err)


def test_the_command_gives_up_on_a_silent_endpoint_within_its_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that never answers: exit 1 once the timeout passes, outcome called unknown."""
    monkeypatch.setenv("MAIN_SECRET", MAIN.client_secret)
    monkeypatch.setattr(cli, "CANCEL_ALL_TIMEOUT_S", 0.2)
    with socket.socket() as listener:  # the kernel completes the handshake; nobody answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        path = cli_config(tmp_path, None, listen=f"127.0.0.1:{listener.getsockname()[1]}")
        assert main(["cancel-all", "main", "--config", str(path)]) == EX_SOFTWARE
    err = capsys.readouterr().err
    assert "no answer from the keeper" in err and "within 0.2s" in err
    SHOWN.append(err)


def test_the_command_needs_none_of_the_keepers_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an operator's shell the service's ${VAR}s are not set: the command reads only the
    http section, so it gets as far as the endpoint (here: nothing listens, exit 1, not 78)."""
    monkeypatch.delenv("MAIN_SECRET", raising=False)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    path = cli_config(tmp_path, None, listen=f"127.0.0.1:{port}")
    assert main(["cancel-all", "main", "--config", str(path)]) == EX_SOFTWARE
    err = capsys.readouterr().err
    assert "nothing listens" in err
    SHOWN.append(err)
