"""The COD guard: a ready session re-reads Cancel-On-Disconnect at its pace and repairs a drift.

Every test runs on the autojump clock against the simulator; what is asserted is what Deribit (the
simulator) saw, what the session logged and counted, and where its state stood meanwhile.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper.errors import NotReady
from deribit_keeper.http import READY_PATH
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.session import Session, SessionState
from deribit_keeper.simulator import SimConnection, Simulator

from .conftest import SIM_ACCOUNTS, LogLines, account_config
from .gateway_support import upstream
from .test_http import http, serve
from .test_metrics import scrape, start_keeper, value
from .test_session import next_ready, until_state

GET = "private/get_cancel_on_disconnect"
ENABLE = "private/enable_cancel_on_disconnect"
INTERVAL = 30.0


def start(nursery: trio.Nursery, sim: Simulator, **overrides: Any) -> Session:
    overrides.setdefault("cod_check_interval", INTERVAL)
    session = Session(account_config(sim, **overrides), rng=random.Random(5))
    nursery.start_soon(session.run)
    return session


def calls(conn: SimConnection, method: str, since: int = 0) -> list[dict[str, Any]]:
    """The params of each ``method`` request ``conn`` received, from request number ``since``."""
    return [params for m, params in conn.requests[since:] if m == method]


async def until_event(session: Session, name: str) -> dict[str, Any]:
    """Wait, without polling, for the session's next event called ``name``; its fields."""
    seen: list[dict[str, Any]] = []
    happened = trio.Event()

    def watch(_session: Session, event: str, fields: Any) -> None:
        if event == name and not seen:
            seen.append(dict(fields))
            happened.set()

    session.watch(watch)
    await happened.wait()
    session.unwatch(watch)
    return seen[0]


class Timeline:
    """Every event of a session with the state and readiness it had when the event came."""

    def __init__(self, session: Session) -> None:
        self.entries: list[tuple[str, SessionState, bool, float]] = []
        session.watch(self._note)

    def _note(self, session: Session, event: str, _fields: Any) -> None:
        self.entries.append((event, session.state, session.ready, trio.current_time()))

    def after(self, event: str) -> list[tuple[str, SessionState, bool, float]]:
        """The entries from the first ``event`` on."""
        names = [e[0] for e in self.entries]
        return self.entries[names.index(event) :]


async def test_account_drift_is_repaired_within_one_interval_and_not_ready_meanwhile(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Account COD turned off behind the keeper's back is noticed at the next check, logged at
    error, counted, turned on and confirmed again on the same link, with /readyz 503 meanwhile."""
    keeper = start_keeper(
        nursery, sim, "main", main={"cancel_on_disconnect": "account", "cod_check_interval": 30}
    )
    session = keeper.sessions["main"]
    port = await serve(nursery, keeper)
    await keeper.changes.until(keeper.all_ready)
    conn = sim.connections[0]
    timeline = Timeline(session)
    sim.set_account_cod("main-id", False)
    turned_off_at = trio.current_time()
    sim.delay_next(ENABLE, 2)  # holds the repair open long enough to look at it

    drift = await until_event(session, "session.cod_drift")
    assert trio.current_time() - turned_off_at <= INTERVAL
    await until_state(session, SessionState.ENABLING_COD)
    assert not session.ready and session.cod_confirmed_at is None
    with pytest.raises(NotReady):
        await session.relay("public/test", {})
    assert (await http(port, f"{READY_PATH}/main")).status == 503
    await until_state(session, SessionState.READY)
    assert (await http(port, f"{READY_PATH}/main")).status == 200

    assert drift == {
        "scope": "account",
        "found": {"scope": "account", "enabled": False},
        "during": "check",
    }
    (logged,) = log_lines.events("session.cod_drift")
    assert logged["level"] == "error" and logged["account"] == "main"
    assert sim.account_cod("main-id") and conn.cod_enabled
    assert len(sim.connections) == 1 and conn.open  # repaired in place: no reconnect, no COD fired
    # Enabled and confirmed again, both scopes, as at connect.
    assert [(m, p["scope"]) for m, p in conn.requests[-4:]] == [
        (ENABLE, "account"),
        (GET, "account"),
        (ENABLE, "connection"),
        (GET, "connection"),
    ]
    after = timeline.after("session.cod_drift")
    states = [(e, state) for e, state, _, _ in after if e != "session.test_request_answered"]
    assert states == [
        ("session.cod_drift", SessionState.READY),
        ("session.enabling_cod", SessionState.ENABLING_COD),
        ("session.ready", SessionState.READY),
    ]
    (again,) = log_lines.events("session.ready", repaired="account")
    assert "setup_ms" not in again and again["repair_ms"] >= 2000
    got = scrape(keeper.metrics)
    assert value(got, "cod_drift_total", account="main", scope="account") == 1
    assert value(got, "cod_drift_total", account="main", scope="connection") == 0
    assert value(got, "session_setup_duration_seconds_count") == 1  # a repair is not a setup
    assert value(got, "session_ready", account="main") == 1


async def test_connection_drift_is_repaired_the_same_way(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """With scope connection, the link's own COD found off is turned on again and confirmed."""
    keeper = start_keeper(nursery, sim, "main", main={"cod_check_interval": 30})
    session = keeper.sessions["main"]
    await keeper.changes.until(keeper.all_ready)
    conn = sim.connections[0]
    sim.misreport_cod()
    drift = await until_event(session, "session.cod_drift")
    assert drift["scope"] == "connection" and drift["found"]["enabled"] is False
    await until_state(session, SessionState.READY)
    assert [(m, p["scope"]) for m, p in conn.requests[-2:]] == [
        (ENABLE, "connection"),
        (GET, "connection"),
    ]
    assert len(sim.connections) == 1 and conn.open and conn.cod_enabled
    assert log_lines.events("session.cod_drift")[0]["level"] == "error"
    got = scrape(keeper.metrics)
    assert value(got, "cod_drift_total", account="main", scope="connection") == 1
    assert value(got, "cod_drift_total", account="main", scope="account") is None  # not guarded


async def test_connection_scope_is_guarded_even_when_the_account_scope_is_configured(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Scope account reads both scopes at each check: the relaying link's COD is the promise."""
    session = start(nursery, sim, cancel_on_disconnect="account")
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    before = len(conn.requests)
    await trio.sleep(INTERVAL + 1)
    assert [p["scope"] for p in calls(conn, GET, before)] == ["account", "connection"]


async def test_account_drift_while_the_link_was_down_is_found_at_the_reconnect(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A reconnect reads the account setting before enabling it again, and reports it off; the
    very first connect does not, as off is where a fresh account starts."""
    keeper = start_keeper(
        nursery, sim, "main", main={"cancel_on_disconnect": "account", "cod_check_interval": 30}
    )
    session = keeper.sessions["main"]
    await keeper.changes.until(keeper.all_ready)
    first = sim.connections[0]
    assert first.methods()[2] == ENABLE  # no reading before the first enable
    sim.set_account_cod("main-id", False)
    await sim.drop(first)  # before any check could notice
    second = await next_ready(session, sim, 1)

    (drift,) = log_lines.events("session.cod_drift")
    assert (drift["scope"], drift["during"], drift["level"]) == ("account", "reconnect", "error")
    assert [(m, p.get("scope")) for m, p in second.requests[2:7]] == [
        (GET, "account"),
        (ENABLE, "account"),
        (GET, "account"),
        (ENABLE, "connection"),
        (GET, "connection"),
    ]
    assert sim.account_cod("main-id") and second.cod_enabled
    got = scrape(keeper.metrics)
    assert value(got, "cod_drift_total", account="main", scope="account") == 1


async def test_a_reconnect_that_finds_cod_on_reports_nothing(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The reading before re-enabling is silent when the account setting held."""
    session = start(nursery, sim, cancel_on_disconnect="account")
    await until_state(session, SessionState.READY)
    await sim.drop(sim.connections[0])
    second = await next_ready(session, sim, 1)
    assert second.methods()[2] == GET
    assert not log_lines.events("session.cod_drift")


async def test_a_refused_check_keeps_the_link_and_is_tried_again(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """13028 on a check is a warning: the link stays ready, and the next interval reads again."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    timeline = Timeline(session)
    before = len(conn.requests)
    sim.fail_next(GET, ErrorCode.TEMPORARILY_UNAVAILABLE)
    await trio.sleep(INTERVAL + 1)
    (failed,) = log_lines.events("session.cod_check_failed")
    assert (failed["level"], failed["code"], failed["during"]) == ("warning", 13028, "check")
    assert session.state is SessionState.READY and conn.open
    await trio.sleep(INTERVAL)
    assert len(calls(conn, GET, before)) == 2  # the refused one, and the next one answered
    assert len(sim.connections) == 1 and conn.open
    assert all(state is SessionState.READY for _, state, _, _ in timeline.entries)
    assert not log_lines.events("session.cod_drift")
    assert not log_lines.events("session.lost")


async def test_a_rate_limited_check_ends_the_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """10028 ends the link: Deribit ends the session then anyway."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.fail_next(GET, ErrorCode.TOO_MANY_REQUESTS)
    await next_ready(session, sim, 1)
    (lost,) = log_lines.events("session.lost")
    assert (lost["reason"], lost["state"]) == ("rpc_error", "ready")
    assert not log_lines.events("session.cod_check_failed")


async def test_an_unanswered_check_is_a_warning_and_the_link_stays(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """One slow answer on a link the watchdog finds alive must not end it (its COD would cancel
    the whole book): logged as session.cod_check_failed, tried again at the next interval."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    sim.delay_next(GET, 10)
    await trio.sleep(INTERVAL * 3)
    assert session.state is SessionState.READY and conn.open and len(sim.connections) == 1
    (failed, *_) = log_lines.events("session.cod_check_failed")
    assert failed["code"] is None and "unanswered" in failed["detail"]
    assert not log_lines.events("session.lost")


async def test_no_check_before_the_interval_and_then_one_per_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """The first reading comes between half an interval and one after READY (accounts ready
    together must not check together for ever), then one every interval."""
    session = start(nursery, sim, cod_check_interval=20)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    ready_at = trio.current_time()
    setup = len(calls(conn, GET))
    await trio.sleep(9.9)
    assert len(calls(conn, GET)) == setup
    await trio.sleep_until(ready_at + 20.1)
    assert len(calls(conn, GET)) == setup + 1
    await trio.sleep_until(ready_at + 20 * 25 + 1)  # 500 s of virtual time, under a token's life
    assert len(calls(conn, GET)) == setup + 25
    assert calls(conn, GET)[-1] == {"scope": "connection"}
    assert session.state is SessionState.READY and len(sim.connections) == 1


async def test_checks_leave_heartbeats_alone(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Checking every 5 s (the least allowed) beside 10 s heartbeats misses no test_request."""
    session = start(nursery, sim, cod_check_interval=5)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    await trio.sleep(302)
    assert conn.open and conn.test_requests_sent >= 29
    assert conn.test_requests_answered == conn.test_requests_sent
    assert len(calls(conn, GET)) == 1 + 60


async def test_a_repair_that_cannot_be_confirmed_ends_the_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """COD found off, turned on, and still not confirmed: the link is lost as at connect."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.misreport_cod(times=2)  # the check, then the repair's confirmation
    await next_ready(session, sim, 1)
    (lost,) = log_lines.events("session.lost")
    assert (lost["reason"], lost["state"]) == ("cod_not_confirmed", "enabling_cod")
    assert lost["uptime_s"] >= INTERVAL / 2  # the link had been ready: its uptime is kept
    assert len(log_lines.events("session.cod_drift")) == 1


async def test_a_token_refresh_that_finds_cod_off_repairs_it_in_place(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    log_lines: LogLines,
) -> None:
    """The refresh's own COD reading goes through the guard: a drift, repaired, no reconnect."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=100)  # refreshed at 80 s
    await nursery.start(sim.serve, 0)
    session = start(nursery, sim, cod_check_interval=3600)
    await until_state(session, SessionState.READY)
    sim.misreport_cod()
    await until_event(session, "session.token_refreshed")
    (drift,) = log_lines.events("session.cod_drift")
    assert (drift["scope"], drift["during"]) == ("connection", "token_refresh")
    assert session.state is SessionState.READY and len(sim.connections) == 1
    names = log_lines.names(account="main")
    assert names[-3:] == ["session.enabling_cod", "session.ready", "session.token_refreshed"]


async def test_a_stop_during_a_repair_still_logs_out(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A link under repair was ready a moment ago: on_shutdown logout is honoured, no COD fires."""
    session = start(nursery, sim, on_shutdown="logout")
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    sim.misreport_cod()
    sim.delay_next(ENABLE, 3)
    await until_state(session, SessionState.ENABLING_COD)
    session.stop()
    await until_state(session, SessionState.STOPPED)
    assert conn.logged_out and not conn.cod_fired
    assert "private/logout" in conn.methods()


async def test_accounts_ready_together_check_cod_at_different_times(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Ready in the same instant (a start, a mass reconnect), a keeper's accounts still read
    COD apart: each session draws its first check's phase."""
    keeper = start_keeper(nursery, sim, "main", "hedge")
    for session in keeper.sessions.values():
        await until_state(session, SessionState.READY)
    links = [upstream(sim, name) for name in ("main", "hedge")]
    setup = [len(calls(link, GET)) for link in links]
    checked_at: dict[int, float] = {}

    def newly_checked() -> list[int]:
        return [
            i
            for i, link in enumerate(links)
            if i not in checked_at and len(calls(link, GET)) > setup[i]
        ]

    while len(checked_at) < len(links):
        await sim.wait_for(lambda: bool(newly_checked()))
        for i in newly_checked():
            checked_at[i] = trio.current_time()
    assert abs(checked_at[0] - checked_at[1]) > 1
