"""The Keeper over several accounts: isolation, shutdown under a deadline, signals, secrets."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper import auth
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import SHUTDOWN_DEADLINE_S, Keeper

from .conftest import SECRETS, LogLines, account_config, keeper_config


async def all_ready(keeper: Keeper) -> None:
    """Wait, without polling, until every session is READY."""
    done = trio.Event()

    def check(*_: object) -> None:
        if all(s.state is SessionState.READY for s in keeper.sessions.values()):
            done.set()

    for session in keeper.sessions.values():
        session.watch(check)
    check()
    await done.wait()


def three_accounts(sim: Simulator, **overrides: Any) -> Keeper:
    config = keeper_config(
        *(account_config(sim, n, **overrides) for n in ("main", "hedge", "third"))
    )
    return Keeper(config, rng=random.Random(5))


async def three_ready(nursery: trio.Nursery, sim: Simulator, **overrides: Any) -> Keeper:
    """A running Keeper of three accounts, once all three are ready."""
    keeper = three_accounts(sim, **overrides)
    await nursery.start(keeper.run)
    await all_ready(keeper)
    return keeper


async def test_every_account_gets_its_own_protected_connection(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Three accounts, three connections, each authenticated as its own client with COD on."""
    keeper = await three_ready(nursery, sim)
    assert sorted(c.client_id or "" for c in sim.connections) == ["hedge-id", "main-id", "third-id"]
    assert all(c.cod_enabled for c in sim.connections)
    assert repr(keeper) == "<Keeper 3/3 ready>"
    assert log_lines.events("keeper.started")[0]["accounts"] == 3


async def test_one_account_failing_leaves_the_others_untouched(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Breaking one account's link again and again never reconnects or logs about the others."""
    await three_ready(nursery, sim)
    others = [c for c in sim.connections if c.client_id != "main-id"]
    for dropped in range(1, 6):
        main = next(c for c in sim.connections if c.client_id == "main-id" and c.open)
        await sim.drop(main, abrupt=True)
        await sim.wait_for(
            lambda n=dropped: (
                len(sim.connections) == 3 + n  # type: ignore[misc]
                and sim.connections[-1].heartbeat_interval is not None
            )
        )
    await trio.sleep(120)
    assert all(c.open for c in others) and len(sim.connections) == 3 + 5
    assert {e["account"] for e in log_lines.events("session.lost")} == {"main"}


async def test_a_bug_in_one_session_is_contained(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception in one account is logged and retried; the others stay ready."""
    real = auth.credential_params

    def broken_for_main(account: Any, **kwargs: Any) -> dict[str, Any]:
        if account.name == "main":
            raise KeyError("a bug")
        return real(account, **kwargs)

    monkeypatch.setattr(auth, "credential_params", broken_for_main)
    keeper = three_accounts(sim)
    await nursery.start(keeper.run)
    await trio.sleep(60)
    states = {name: s.state for name, s in keeper.sessions.items()}
    assert states["hedge"] is states["third"] is SessionState.READY
    assert states["main"] is not SessionState.READY
    assert log_lines.events("session.unexpected_error", account="main")
    assert {e["reason"] for e in log_lines.events("session.lost")} == {"internal_error"}


@pytest.mark.parametrize("on_shutdown", ["close", "logout"])
async def test_stop_ends_every_session_per_on_shutdown(
    autojump_clock: trio.testing.MockClock, sim: Simulator, log_lines: LogLines, on_shutdown: str
) -> None:
    """keeper.stop(): each link ends as configured, then keeper.stopped is logged."""
    keeper = three_accounts(sim, on_shutdown=on_shutdown)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await all_ready(keeper)
        keeper.stop()
    await sim.wait_for(lambda: not any(c.open for c in sim.connections))
    assert all(c.logged_out is (on_shutdown == "logout") for c in sim.connections)
    assert all(c.cod_fired is (on_shutdown == "close") for c in sim.connections)
    assert log_lines.names()[-1] == "keeper.stopped"
    assert {s.state for s in keeper.sessions.values()} == {SessionState.STOPPED}


async def test_shutdown_meets_its_deadline_when_deribit_never_answers(
    autojump_clock: trio.testing.MockClock, sim: Simulator, log_lines: LogLines
) -> None:
    """Logout to an exchange gone silent: the keeper still ends within 5 s."""
    keeper = three_accounts(sim, on_shutdown="logout")
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await all_ready(keeper)
        for conn in sim.connections:
            sim.go_silent(conn)
        asked = trio.current_time()
        keeper.stop()
    assert trio.current_time() - asked <= SHUTDOWN_DEADLINE_S
    assert log_lines.names()[-1] == "keeper.stopped"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_keeper_cleanly(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
    log_lines: LogLines,
    signum: signal.Signals,
) -> None:
    """SIGTERM or SIGINT, even with a handshake pending, stops every session and returns."""
    sim.delay_next("public/auth", 30)
    keeper = three_accounts(sim)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await sim.wait_for(lambda: any("public/auth" in c.methods() for c in sim.connections))
        os.kill(os.getpid(), signum)
    stopping = log_lines.events("keeper.stopping")
    assert [e["reason"] for e in stopping] == [signum.name]
    assert log_lines.names()[-1] == "keeper.stopped"


async def test_no_secret_or_token_reaches_any_output(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, log_lines: LogLines
) -> None:
    """A busy hour (refreshes, faults, both auth kinds) logs no secret and no issued token."""
    from .conftest import SIM_ACCOUNTS

    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=120)
    await nursery.start(sim.serve, 0)
    config = keeper_config(
        account_config(sim, "main", auth="credentials"),
        account_config(sim, "hedge", auth="signature"),
        account_config(sim, "third", auth="credentials", on_shutdown="logout"),
    )
    keeper = Keeper(config, rng=random.Random(1))
    async with trio.open_nursery() as inner:
        await inner.start(keeper.run)
        await all_ready(keeper)
        for _ in range(3):
            await trio.sleep(400)
            await sim.drop(next(c for c in sim.connections if c.open), abrupt=True)
            await sim.send_raw(next(c for c in sim.connections if c.open), '{"access_token": "x')
        keeper.stop()
    assert len(sim.issued_tokens) > 20
    rendered = [log_lines.text, repr(keeper), repr(config), str(config)]
    rendered += [repr(s) for s in keeper.sessions.values()]
    rendered += [repr(a) for a in config.accounts]
    for text in rendered:
        for secret in SECRETS:
            assert secret not in text
        for token in sim.issued_tokens:
            assert token not in text


async def test_a_crashing_observer_is_contained(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """An observer (metrics, status) that raises is logged; no session, own or other, ends."""
    keeper = await three_ready(nursery, sim)

    def broken(_session: object, event: str, _fields: object) -> None:
        if event == "session.lost":
            raise KeyError("a metrics bug")

    keeper.sessions["main"].watch(broken)
    main = next(c for c in sim.connections if c.client_id == "main-id")
    await sim.drop(main, abrupt=True)
    await sim.wait_for(lambda: len(sim.connections) == 4)
    await all_ready(keeper)
    assert sum(c.open for c in sim.connections) == 3
    assert log_lines.events("session.observer_failed", account="main")


async def test_the_shutdown_deadline_cuts_a_hanging_logout(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
    log_lines: LogLines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even a logout willing to wait a minute is cut at the keeper's 4.5 s deadline."""
    from deribit_keeper import session as session_module

    monkeypatch.setattr(session_module, "LOGOUT_TIMEOUT_S", 60.0)
    keeper = three_accounts(sim, on_shutdown="logout")
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await all_ready(keeper)
        for conn in sim.connections:
            sim.go_silent(conn)
        asked = trio.current_time()
        keeper.stop()
    assert trio.current_time() - asked == pytest.approx(SHUTDOWN_DEADLINE_S, abs=0.01)
    assert log_lines.names()[-1] == "keeper.stopped"


async def test_a_shard_keeps_only_its_accounts_and_may_hold_none(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Across COUNT shards every account runs exactly once; an empty shard idles until stopped."""
    from deribit_keeper.shard import Shard

    config = keeper_config(*(account_config(sim, n) for n in ("main", "hedge", "third")))
    keepers = [Keeper(config, rng=random.Random(i), shard=Shard(i, 5)) for i in range(5)]
    for keeper in keepers:
        await nursery.start(keeper.run)
    for keeper in keepers:
        await all_ready(keeper)
    held = sorted(name for keeper in keepers for name in keeper.sessions)
    assert held == ["hedge", "main", "third"]
    assert len(sim.connections) == 3
    idle = next(k for k in keepers if not k.sessions)
    await trio.sleep(60)
    assert idle.alive()
    for keeper in keepers:
        keeper.stop()


async def test_config_warnings_are_logged_at_start(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A warning the config carries (a readable secret file) is logged once the keeper starts."""
    import dataclasses

    from deribit_keeper.config import ConfigWarning

    warning = ConfigWarning("config.secret_file_readable", "accounts[0].client_secret_file", "x")
    config = dataclasses.replace(keeper_config(account_config(sim)), warnings=(warning,))
    keeper = Keeper(config, rng=random.Random(1))
    await nursery.start(keeper.run)
    (logged,) = log_lines.events("config.secret_file_readable")
    assert logged["level"] == "warning" and logged["key_path"] == "accounts[0].client_secret_file"
    keeper.stop()
