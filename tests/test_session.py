"""One account's lifecycle against the simulator: setup order, heartbeats, tokens, every fault.

Every test runs on the autojump clock; what is asserted is what Deribit (the simulator) saw.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper import logs
from deribit_keeper.config import BackoffConfig, LogConfig, Secret
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.session import Session, SessionState, silence_limit
from deribit_keeper.simulator import SimConnection, Simulator

from .conftest import SIM_ACCOUNTS, LogLines, account_config

SETUP = [
    "public/hello",
    "public/auth",
    "private/enable_cancel_on_disconnect",
    "private/get_cancel_on_disconnect",
    "public/set_heartbeat",
]


def start(nursery: trio.Nursery, sim: Simulator, **overrides: Any) -> Session:
    session = Session(account_config(sim, **overrides), rng=random.Random(3))
    nursery.start_soon(session.run)
    return session


async def until_state(session: Session, state: SessionState) -> None:
    """Wait, without polling, until the session enters ``state``."""
    if session.state is state:
        return
    entered = trio.Event()
    session.watch(lambda s, _event, _fields: entered.set() if s.state is state else None)
    await entered.wait()


async def short_token_sim(nursery: trio.Nursery) -> Simulator:
    """A simulator whose tokens live 100 s, so refreshes come every 80 s."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=100)
    await nursery.start(sim.serve, 0)
    return sim


async def stop_when_ready(session: Session, sim: Simulator) -> SimConnection:
    """Let ``session`` become ready, stop it, and return its link once that has closed."""
    await until_state(session, SessionState.READY)
    session.stop()
    await until_state(session, SessionState.STOPPED)
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    return conn


async def next_ready(session: Session, sim: Simulator, after: int) -> SimConnection:
    """Wait until the session is READY on a connection newer than connection number ``after``."""
    await sim.wait_for(lambda: len(sim.connections) > after)
    await until_state(session, SessionState.READY)
    return sim.connections[-1]


async def test_ready_only_after_cod_is_enabled_and_confirmed(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The setup runs hello, auth, COD enable, COD confirm, heartbeat in order, then READY."""
    session = start(nursery, sim)
    with trio.fail_after(10):
        await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    assert conn.methods() == SETUP
    assert conn.requests[2][1] == {"scope": "connection"}
    assert conn.requests[3][1] == {"scope": "connection"}
    assert conn.requests[4][1] == {"interval": 10}
    assert conn.cod_enabled and conn.client_id == "main-id"
    assert repr(session) == "<Session main ready>"
    ready = log_lines.events("session.ready")
    assert len(ready) == 1
    assert ready[0]["account"] == "main"
    assert ready[0]["cod_scope"] == "connection"
    assert ready[0]["heartbeat_interval"] == 10.0
    assert ready[0]["setup_ms"] >= 0
    assert log_lines.names(account="main")[:4] == [
        "session.connecting",
        "session.authenticating",
        "session.enabling_cod",
        "session.ready",
    ]


async def test_hello_names_the_client(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """public/hello introduces the keeper by name and version."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    hello = sim.connections[0].requests[0][1]
    assert hello["client_name"] == "deribit-keeper"
    assert isinstance(hello["client_version"], str) and hello["client_version"]


async def test_signature_auth_never_sends_the_secret(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """client_signature auth carries a signature, a timestamp and a nonce, not the secret."""
    session = start(nursery, sim, auth="signature")
    await until_state(session, SessionState.READY)
    params = sim.connections[0].requests[1][1]
    assert params["grant_type"] == "client_signature"
    assert {"timestamp", "nonce", "signature", "client_id"} <= params.keys()
    assert "client_secret" not in params


async def test_credentials_auth_uses_client_credentials(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """auth: credentials sends grant_type client_credentials and still reaches READY."""
    session = start(nursery, sim, auth="credentials")
    await until_state(session, SessionState.READY)
    assert sim.connections[0].requests[1][1]["grant_type"] == "client_credentials"


async def test_account_scope_sets_the_account_and_protects_this_connection_too(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Scope account enables and confirms the account setting and the current connection."""
    session = start(nursery, sim, cancel_on_disconnect="account")
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    cod_calls = [(m, p) for m, p in conn.requests if "cancel_on_disconnect" in m]
    assert cod_calls == [
        ("private/enable_cancel_on_disconnect", {"scope": "account"}),
        ("private/get_cancel_on_disconnect", {"scope": "account"}),
        ("private/enable_cancel_on_disconnect", {"scope": "connection"}),
        ("private/get_cancel_on_disconnect", {"scope": "connection"}),
    ]
    assert sim.account_cod("main-id") and conn.cod_enabled


async def test_every_test_request_is_answered_for_an_hour(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """An hour of 10 s heartbeats: every test_request answered, one connection throughout."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    await trio.sleep(3605)  # mid-interval, so the last test_request's answer has arrived
    conn = sim.connections[0]
    assert len(sim.connections) == 1 and conn.open
    assert conn.test_requests_sent == 360
    assert conn.test_requests_answered == conn.test_requests_sent
    assert session.test_requests_answered == conn.test_requests_answered


async def test_each_answered_test_request_is_logged_at_debug_only(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """At debug every answer is a line with its latency; at info there is none, and the
    count (which metrics show) goes on."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    await trio.sleep(35)
    answered = log_lines.events("session.test_request_answered")
    assert len(answered) == session.test_requests_answered == 3
    assert all(isinstance(line["latency_ms"], float) for line in answered)
    logs.configure(LogConfig(level="info", format="json"), stream=log_lines.stream)
    await trio.sleep(30)
    assert session.test_requests_answered == 6
    assert len(log_lines.events("session.test_request_answered")) == 3


async def test_token_is_refreshed_before_it_expires_on_the_same_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, log_lines: LogLines
) -> None:
    """With 100 s tokens, refreshes keep one connection authenticated and COD re-confirmed."""
    sim = await short_token_sim(nursery)
    session = start(nursery, sim, cod_check_interval=3600)  # no periodic COD check in between
    await until_state(session, SessionState.READY)
    await trio.sleep(1000)
    conn = sim.connections[0]
    assert len(sim.connections) == 1 and conn.open
    grants = [p["grant_type"] for m, p in conn.requests if m == "public/auth"]
    assert grants[0] == "client_signature"
    assert grants.count("refresh_token") >= 10
    refreshed = log_lines.events("session.token_refreshed")
    assert len(refreshed) == grants.count("refresh_token")
    # After every refresh COD was asked about again.
    assert conn.methods().count("private/get_cancel_on_disconnect") == 1 + len(refreshed)
    assert session.state is SessionState.READY


async def _drop_clean(sim: Simulator, conn: SimConnection) -> None:
    await sim.drop(conn)


async def _drop_abrupt(sim: Simulator, conn: SimConnection) -> None:
    await sim.drop(conn, abrupt=True)


async def _silence(sim: Simulator, conn: SimConnection) -> None:
    sim.go_silent(conn)


async def _garbage(sim: Simulator, conn: SimConnection) -> None:
    await sim.send_raw(conn, "this is not json")


async def _error_without_id(sim: Simulator, conn: SimConnection) -> None:
    await sim.send_raw(
        conn, '{"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}'
    )


def _heartbeats_stop(sim: Simulator, conn: SimConnection) -> None:
    sim.suppress_test_requests(conn)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (_drop_clean, "closed_by_server"),
        (_drop_abrupt, "connection_dropped"),
        (_silence, "heartbeat_silence"),
        (_garbage, "malformed_frame"),
        (_error_without_id, "request_rejected"),
    ],
)
async def test_a_broken_ready_link_is_noticed_and_rebuilt(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    fault: Any,
    reason: str,
) -> None:
    """Each way a live link breaks ends it with a reason, then a fresh COD-confirmed one."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    with trio.fail_after(60):
        await fault(sim, sim.connections[0])
        await sim.wait_for(lambda: len(sim.connections) == 2)
        second = await next_ready(session, sim, 1)
    assert not sim.connections[0].open
    assert second.methods() == SETUP and second.cod_enabled
    lost = log_lines.events("session.lost")
    assert [e["reason"] for e in lost] == [reason]
    assert lost[0]["state"] == "ready"
    retry = log_lines.events("session.retry")
    assert len(retry) == 1 and retry[0]["attempt"] == 1 and retry[0]["delay_s"] <= 0.5


async def test_heartbeats_that_stop_on_a_live_link_are_set_again_on_that_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Quiet for 1.1 intervals, the link is probed; it answers, so it is kept (a reconnect
    would fire COD) and asked for heartbeats again, with a warning: without them Deribit would
    not notice the link die."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    _heartbeats_stop(sim, conn)
    assert session.rpc is not None
    await trio.sleep(60)
    assert conn.open and len(sim.connections) == 1
    assert not log_lines.events("session.lost")
    restarted = log_lines.events("session.heartbeat_restarted")
    assert restarted and all(11 <= e["quiet_s"] < 12 for e in restarted)
    assert conn.methods().count("public/set_heartbeat") == 1 + len(restarted)
    assert session.state is SessionState.READY


async def test_a_silent_link_is_declared_dead_after_interval_plus_grace(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Silence is noticed 1.2 heartbeat intervals after the last frame (a probe sent at 1.1
    goes unanswered) and the TCP is aborted."""
    session = start(nursery, sim, heartbeat_interval=20)
    await until_state(session, SessionState.READY)
    await trio.sleep(35)  # a few heartbeats in
    conn = sim.connections[0]
    assert session.rpc is not None
    last_frame = session.rpc.last_inbound
    sim.go_silent(conn)
    await sim.wait_for(lambda: not conn.open)
    noticed = trio.current_time()
    assert noticed - last_frame == pytest.approx(silence_limit(20), abs=0.05)
    assert conn.abrupt and conn.closed_by == "client" and conn.cod_fired


@pytest.mark.parametrize("method", SETUP)
async def test_an_error_at_any_setup_step_means_no_ready_and_a_retry(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    method: str,
) -> None:
    """A Deribit error during setup: no session.ready on that link, it is dropped, retried."""
    sim.fail_next(method, ErrorCode.TEMPORARILY_UNAVAILABLE)
    session = start(nursery, sim)
    with trio.fail_after(30):
        second = await next_ready(session, sim, 1)
    first = sim.connections[0]
    assert first.methods() == SETUP[: SETUP.index(method) + 1]
    assert not first.open and first.closed_by == "client"
    assert second.methods() == SETUP
    lost = log_lines.events("session.lost")
    assert [(e["reason"], e["code"]) for e in lost] == [("rpc_error", 13028)]
    assert len(log_lines.events("session.ready")) == 1


async def test_cod_that_is_not_confirmed_is_never_reported_ready(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """get_cancel_on_disconnect saying enabled: false drops the link before READY."""
    sim.misreport_cod()
    session = start(nursery, sim)
    with trio.fail_after(30):
        await next_ready(session, sim, 1)
    assert [e["reason"] for e in log_lines.events("session.lost")] == ["cod_not_confirmed"]
    first_ready_at = log_lines.names().index("session.ready")
    assert log_lines.names().index("session.lost") < first_ready_at
    assert "public/set_heartbeat" not in sim.connections[0].methods()


async def test_a_slow_answer_times_out_and_the_link_is_rebuilt(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """An answer slower than request_timeout ends that attempt with request_timeout."""
    sim.delay_next("private/enable_cancel_on_disconnect", 60)
    session = start(nursery, sim, request_timeout=5)
    with trio.fail_after(30):
        await next_ready(session, sim, 1)
    assert [e["reason"] for e in log_lines.events("session.lost")] == ["request_timeout"]


async def test_refused_handshakes_back_off_with_growing_jittered_capped_delays(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Ten refused handshakes: each delay within its doubling ceiling, capped, jittered."""
    sim.refuse_handshakes(10, status=429)
    session = start(nursery, sim, backoff=BackoffConfig(0.5, 8.0))
    with trio.fail_after(300):
        await until_state(session, SessionState.READY)
    retries = log_lines.events("session.retry")
    assert [e["attempt"] for e in retries] == list(range(1, 11))
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(10)]
    assert all(0 <= e["delay_s"] <= c for e, c in zip(retries, ceilings, strict=True))
    assert len({e["delay_s"] for e in retries}) == 10  # jittered, not a fixed ladder
    assert max(e["delay_s"] for e in retries[5:]) > 4.0  # and it did grow
    assert {e["reason"] for e in log_lines.events("session.lost")} == {"handshake_rejected"}


@pytest.mark.parametrize(("auth", "code"), [("credentials", 13004), ("signature", 13009)])
async def test_a_wrong_secret_retries_slowly_and_logs_errors(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    auth: str,
    code: int,
) -> None:
    """A wrong secret is an operator problem: error-level logs, delays near the cap, no READY."""
    session = start(nursery, sim, auth=auth, client_secret=Secret("nope"))
    await trio.sleep(200)
    assert session.state is not SessionState.READY
    lost = log_lines.events("session.lost")
    assert len(lost) >= 5
    assert {(e["level"], e["code"], e["severity"]) for e in lost} == {("error", code, "persistent")}
    assert all(27.0 <= e["delay_s"] <= 30.0 for e in log_lines.events("session.retry"))


async def test_rate_limit_waits_near_the_cap(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """10028 (and the close that comes with it) backs off for at least half the cap."""
    sim.fail_next("public/auth", ErrorCode.TOO_MANY_REQUESTS, close_after=True)
    session = start(nursery, sim)
    with trio.fail_after(60):
        await next_ready(session, sim, 1)
    (retry,) = log_lines.events("session.retry")
    assert 15.0 <= retry["delay_s"] <= 30.0
    assert log_lines.events("session.lost")[0]["severity"] == "rate_limited"


async def test_backoff_resets_after_a_stable_connection(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A link that stayed ready for minutes before dying retries from the initial delay."""
    sim.refuse_handshakes(6)
    session = start(nursery, sim)
    with trio.fail_after(600):
        await until_state(session, SessionState.READY)
        await trio.sleep(120)
        await sim.drop(sim.connections[-1], abrupt=True)
        await sim.wait_for(lambda: len(log_lines.events("session.retry")) == 7)
    assert log_lines.events("session.retry")[-1]["attempt"] == 1
    assert log_lines.events("session.retry")[-1]["delay_s"] <= 0.5


async def test_stop_while_ready_closes_without_logout_so_cod_fires(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """on_shutdown close: a WebSocket close, no logout; Deribit applies COD."""
    session = start(nursery, sim, on_shutdown="close")
    conn = await stop_when_ready(session, sim)
    assert "private/logout" not in conn.methods()
    assert conn.closed_by == "client" and conn.close_code == 1000 and not conn.abrupt
    assert conn.cod_fired and not conn.logged_out


async def test_stop_while_ready_logs_out_first_so_orders_stay(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """on_shutdown logout: private/logout first; Deribit closes and COD does not fire."""
    session = start(nursery, sim, on_shutdown="logout")
    conn = await stop_when_ready(session, sim)
    assert conn.methods()[-1] == "private/logout"
    assert conn.logged_out and not conn.cod_fired


async def test_logout_against_a_silent_exchange_still_ends_in_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """If Deribit never closes after logout, the session gives up waiting within seconds."""
    session = start(nursery, sim, on_shutdown="logout")
    await until_state(session, SessionState.READY)
    sim.go_silent(sim.connections[0])
    asked = trio.current_time()
    session.stop()
    await until_state(session, SessionState.STOPPED)
    assert trio.current_time() - asked <= 4.5


@pytest.mark.parametrize(
    "stalled", ["public/hello", "public/auth", "private/enable_cancel_on_disconnect"]
)
async def test_stop_in_the_middle_of_setup_ends_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, stalled: str
) -> None:
    """A stop while a setup answer is pending does not wait for it."""
    sim.delay_next(stalled, 3)
    session = start(nursery, sim)
    await sim.wait_for(lambda: bool(sim.connections) and stalled in sim.connections[0].methods())
    asked = trio.current_time()
    session.stop()
    await until_state(session, SessionState.STOPPED)
    assert trio.current_time() - asked < 0.1
    await sim.wait_for(lambda: not sim.connections[0].open)


async def test_stop_during_backoff_ends_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A stop while waiting to retry does not wait for the delay."""
    sim.fail_next("public/auth", ErrorCode.INVALID_CREDENTIALS)
    session = start(nursery, sim)
    await until_state(session, SessionState.BACKOFF)
    asked = trio.current_time()
    session.stop()
    await until_state(session, SessionState.STOPPED)
    assert trio.current_time() - asked < 0.1


async def test_a_refused_refresh_reauthenticates_on_the_same_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, log_lines: LogLines
) -> None:
    """A revoked refresh token is replaced by a fresh auth, without a reconnect firing COD."""
    sim = await short_token_sim(nursery)
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.fail_next("public/auth", ErrorCode.UNAUTHORIZED)
    await trio.sleep(150)
    conn = sim.connections[0]
    assert len(sim.connections) == 1 and conn.open and not conn.cod_fired
    grants = [p["grant_type"] for m, p in conn.requests if m == "public/auth"]
    assert grants == ["client_signature", "refresh_token", "client_signature"]
    assert [e["code"] for e in log_lines.events("session.token_refresh_refused")] == [13009]
    assert [e["grant"] for e in log_lines.events("session.token_refreshed")] == ["client_signature"]
    assert session.state is SessionState.READY


async def test_a_loss_while_stopping_does_not_wait_out_a_backoff(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """If the link dies just as a stop begins, the session ends instead of retrying."""
    session = start(nursery, sim, on_shutdown="logout")
    await until_state(session, SessionState.READY)
    sim.go_silent(sim.connections[0])
    session.stop()
    await sim.drop(sim.connections[0], abrupt=True)
    asked = trio.current_time()
    await until_state(session, SessionState.STOPPED)
    assert trio.current_time() - asked < 0.1
    assert len(sim.connections) == 1


async def test_snapshot_and_observers_follow_the_lifecycle(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Observers see every event with its fields; snapshot() says what /status will show."""
    seen: list[tuple[str, str]] = []
    timed: list[str] = []
    session = Session(
        account_config(sim), rng=random.Random(1), on_request=lambda m, s: timed.append(m)
    )
    session.watch(lambda s, event, fields: seen.append((event, s.state.value)))
    assert session.snapshot()["state"] == "stopped"
    nursery.start_soon(session.run)
    await until_state(session, SessionState.READY)
    await trio.sleep(25)
    ready = session.snapshot()
    assert ready["state"] == "ready" and ready["ready"] is True
    assert ready["cod_scope"] == "connection" and ready["cod_confirmed_at"].endswith("Z")
    assert ready["seconds_since_last_message"] == pytest.approx(5, abs=0.1)
    assert ready["reconnects"] == 0 and ready["last_error"] is None
    await sim.drop(sim.connections[0], abrupt=True)
    await sim.wait_for(lambda: len(sim.connections) == 2)
    await until_state(session, SessionState.READY)
    again = session.snapshot()
    assert again["reconnects"] == 1 and again["last_error"]["reason"] == "connection_dropped"
    assert ("session.ready", "ready") in seen and ("session.retry", "backoff") in seen
    assert ("session.lost", "lost") in seen and ("session.ready", "ready") in seen
    assert timed[:5] == SETUP and "public/test" in timed


async def test_an_error_answer_to_public_test_keeps_the_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Deribit counts the public/test itself; an error reply is logged, the link stays up."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.fail_next("public/test", ErrorCode.TEMPORARILY_UNAVAILABLE)
    await trio.sleep(60)
    assert len(sim.connections) == 1 and sim.connections[0].open
    assert [e["code"] for e in log_lines.events("session.test_request_refused")] == [13028]
    assert not log_lines.events("session.lost")


async def test_a_rate_limit_on_public_test_ends_the_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """10028 terminates the session on Deribit's side: the keeper backs off near the cap."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.fail_next("public/test", ErrorCode.TOO_MANY_REQUESTS, close_after=True)
    await sim.wait_for(lambda: not sim.connections[0].open)
    await until_state(session, SessionState.BACKOFF)
    (lost,) = log_lines.events("session.lost")
    assert lost["severity"] == "rate_limited"


async def test_a_rate_limit_on_refresh_backs_off_instead_of_reauthenticating(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, log_lines: LogLines
) -> None:
    """Only 13009 on a refresh earns a fresh auth; 10028 ends the link and waits near the cap."""
    sim = await short_token_sim(nursery)
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    sim.fail_next("public/auth", ErrorCode.TOO_MANY_REQUESTS, close_after=True)
    await until_state(session, SessionState.BACKOFF)
    grants = [p["grant_type"] for m, p in sim.connections[0].requests if m == "public/auth"]
    assert grants == ["client_signature", "refresh_token"]
    assert not log_lines.events("session.token_refresh_refused")
    (retry,) = log_lines.events("session.retry")
    assert retry["delay_s"] >= 15.0


async def test_a_refused_logout_is_an_error_because_cod_will_fire(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """If Deribit refuses private/logout, the keeper says so at error level and still stops."""
    sim.fail_next("private/logout", ErrorCode.TEMPORARILY_UNAVAILABLE)
    session = start(nursery, sim, on_shutdown="logout")
    conn = await stop_when_ready(session, sim)
    assert conn.cod_fired and not conn.logged_out
    (failed,) = log_lines.events("session.logout_failed")
    assert failed["level"] == "error" and "13028" in failed["detail"]


async def test_not_ready_as_soon_as_a_stop_begins(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """While a logout is in flight the session already reports stopping, not ready."""
    sim.delay_next("private/logout", 2)
    session = start(nursery, sim, on_shutdown="logout")
    await until_state(session, SessionState.READY)
    assert session.ready
    session.stop()
    await until_state(session, SessionState.STOPPING)
    assert not session.ready and session.snapshot()["ready"] is False
    await until_state(session, SessionState.STOPPED)


async def test_not_ready_the_moment_the_link_dies(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Every observer call after the link broke sees ready False, before any backoff."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    readiness: list[tuple[str, bool]] = []
    session.watch(lambda s, event, _f: readiness.append((event, s.ready)))
    await sim.drop(sim.connections[0], abrupt=True)
    await until_state(session, SessionState.BACKOFF)
    assert readiness[:2] == [("session.lost", False), ("session.retry", False)]


async def test_a_public_test_left_unanswered_ends_the_link_at_request_timeout(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The reader sends each test_request's public/test itself; an answer that does not come
    within request_timeout ends the link then, long before the silence rule would."""
    session = start(nursery, sim, request_timeout=5)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    sim.delay_next("public/test", 600)
    asked = conn.methods().count("public/test")
    with trio.fail_after(60):
        await sim.wait_for(lambda: conn.methods().count("public/test") > asked)
        asked_at = trio.current_time()
        await sim.wait_for(lambda: not conn.open)
    assert trio.current_time() - asked_at == pytest.approx(5, abs=0.05)
    await until_state(session, SessionState.BACKOFF)
    (lost,) = log_lines.events("session.lost")
    assert lost["reason"] == "request_timeout" and "public/test" in lost["detail"]


async def test_silence_during_a_cod_check_is_a_dead_link_whatever_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A link that falls silent while a COD check waits for its answer is dead 1.2 intervals
    after its last frame, even when request_timeout is far longer."""
    session = start(nursery, sim, request_timeout=60, cod_check_interval=30)
    await until_state(session, SessionState.READY)
    conn = sim.connections[0]
    checks = conn.methods().count("private/get_cancel_on_disconnect")
    sim.delay_next("private/get_cancel_on_disconnect", 600)
    with trio.fail_after(120):
        await sim.wait_for(
            lambda: conn.methods().count("private/get_cancel_on_disconnect") > checks
        )
        sim.go_silent(conn)
        assert session.rpc is not None
        last_frame = session.rpc.last_inbound
        await sim.wait_for(lambda: not conn.open)
    assert trio.current_time() - last_frame == pytest.approx(silence_limit(10), abs=0.05)
    await until_state(session, SessionState.BACKOFF)
    (lost,) = log_lines.events("session.lost")
    assert lost["reason"] == "heartbeat_silence"
