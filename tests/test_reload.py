"""Reload (SIGHUP): only what changed is touched; a bad file changes nothing."""

from __future__ import annotations

import os
import random
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deribit_keeper.config import load_config
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import SimConnection, Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import SIM_ACCOUNTS, LogLines
from .test_supervisor import all_ready


def write(
    path: Path, sim: Simulator, accounts: str, *, level: str = "debug", top: str = ""
) -> Path:
    """A config file for ``sim``: ``accounts`` (made with ``entry``), plus ``top``-level keys."""
    path.write_text(
        textwrap.dedent(
            f"""\
            log: {{level: {level}, format: json}}
            defaults: {{url: "{sim.url}"}}
            accounts:
            """
        )
        + textwrap.indent(textwrap.dedent(accounts), "  ")
        + top
    )
    return path


async def keeper_on(nursery: trio.Nursery, path: Path, **options: Any) -> Keeper:
    """A Keeper running the config at ``path``, once every account is ready."""
    keeper = Keeper(load_config(path), rng=random.Random(1), **options)
    await nursery.start(keeper.run)
    await all_ready(keeper)
    return keeper


def entry(name: str, extra: str = "") -> str:
    account = next(a for a in SIM_ACCOUNTS if a.name == name)
    return (
        f"- name: {name}\n  client_id: {account.client_id}\n"
        f"  client_secret: {account.client_secret}\n{extra}"
    )


def open_connection_of(sim: Simulator, client_id: str) -> SimConnection:
    (conn,) = [c for c in sim.connections if c.open and c.client_id == client_id]
    return conn


async def test_reload_touches_only_added_removed_and_changed_accounts(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """Unchanged main keeps its connection; hedge is restarted, third added, then removed."""
    path = write(tmp_path / "c.yaml", sim, entry("main") + entry("hedge"))
    keeper = await keeper_on(nursery, path)
    main_conn = open_connection_of(sim, "main-id")
    old_hedge = open_connection_of(sim, "hedge-id")

    write(path, sim, entry("main") + entry("hedge", "  heartbeat_interval: 20\n") + entry("third"))
    result = keeper.reload_from_disk()
    assert result is not None
    assert (result.added, result.removed, result.changed) == (("third",), (), ("hedge",))
    await sim.wait_for(lambda: sum(c.open for c in sim.connections) == 3 and not old_hedge.open)
    await all_ready(keeper)
    await trio.sleep(60)
    assert open_connection_of(sim, "main-id") is main_conn
    assert main_conn.methods().count("public/auth") == 1
    assert open_connection_of(sim, "hedge-id").heartbeat_interval == 20
    assert old_hedge.cod_fired  # the old hedge link ended per on_shutdown: close
    (reloaded,) = log_lines.events("keeper.reloaded")
    assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
        ["third"],
        [],
        ["hedge"],
    )

    write(path, sim, entry("main") + entry("hedge", "  heartbeat_interval: 20\n"))
    keeper.reload_from_disk()
    third = open_connection_of(sim, "third-id")
    await sim.wait_for(lambda: not third.open)
    await trio.sleep(1)
    assert sorted(keeper.sessions) == ["hedge", "main"]
    assert open_connection_of(sim, "main-id") is main_conn


async def test_a_changed_secret_restarts_the_account(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    tmp_path: Path,
) -> None:
    """A new secret counts as a change: the account reconnects with it."""
    path = write(tmp_path / "c.yaml", sim, entry("main"))
    keeper = await keeper_on(nursery, path)
    write(path, sim, entry("main").replace("main-SECRET-do-not-log", "rotated"))
    result = keeper.reload_from_disk()
    assert result is not None and result.changed == ("main",)
    await sim.wait_for(lambda: len(sim.connections) == 2)
    await trio.sleep(5)
    assert keeper.sessions["main"].state is not SessionState.READY  # the simulator rejects it


async def test_an_invalid_config_changes_nothing(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """A broken file on reload: keeper.reload_failed with the reason, every link untouched."""
    path = write(tmp_path / "c.yaml", sim, entry("main") + entry("hedge"))
    keeper = await keeper_on(nursery, path)
    before = list(sim.connections)
    path.write_text(path.read_text().replace("accounts:", "acounts:"))
    assert keeper.reload_from_disk() is None
    await trio.sleep(60)
    assert sim.connections == before and all(c.open for c in before)
    (failed,) = log_lines.events("keeper.reload_failed")
    assert "acounts" in failed["reason"] and failed["level"] == "error"
    assert not log_lines.events("keeper.reloaded")


async def test_a_log_level_change_applies_at_once(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """Raising the level to warning silences info and debug lines from then on."""
    path = write(tmp_path / "c.yaml", sim, entry("main"))
    keeper = await keeper_on(nursery, path)
    write(path, sim, entry("main"), level="warning")
    keeper.reload_from_disk()
    mark = len(log_lines.events())
    await trio.sleep(100)  # ten test_requests answered, at debug
    await sim.drop(open_connection_of(sim, "main-id"), abrupt=True)
    await all_ready(keeper)
    await trio.sleep(1)
    later = log_lines.events()[mark:]
    assert later and {e["level"] for e in later} == {"warning"}


async def test_sighup_reloads_even_when_every_account_is_replaced(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """SIGHUP reloads; replacing every account by another works without a restart."""
    path = write(tmp_path / "c.yaml", sim, entry("main"))
    keeper = await keeper_on(nursery, path)
    first = open_connection_of(sim, "main-id")
    write(path, sim, entry("hedge"))
    os.kill(os.getpid(), signal.SIGHUP)
    await sim.wait_for(
        lambda: not first.open and any(c.client_id == "hedge-id" for c in sim.connections)
    )
    await all_ready(keeper)
    assert list(keeper.sessions) == ["hedge"]
    assert log_lines.events("keeper.reloaded")[0]["removed"] == ["main"]
    assert keeper.alive()


async def most_links_at_once(sim: Simulator, client_id: str, seen: list[int]) -> None:
    """Record in ``seen[0]`` the most links ``client_id`` ever held open at once."""

    def count() -> bool:
        open_now = sum(c.open and c.client_id == client_id for c in sim.connections)
        seen[0] = max(seen[0], open_now)
        return False

    await sim.wait_for(count)


SLOW_LOGOUT = "  on_shutdown: logout\n"


async def test_reloads_in_quick_succession_never_double_an_account(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    """Two changes before the old session has ended: one link at a time, the newest config wins."""
    path = write(tmp_path / "c.yaml", sim, entry("main", SLOW_LOGOUT))
    keeper = await keeper_on(nursery, path)
    peak = [0]
    nursery.start_soon(most_links_at_once, sim, "main-id", peak)
    sim.delay_next("private/logout", 2)
    write(path, sim, entry("main", SLOW_LOGOUT + "  heartbeat_interval: 20\n"))
    keeper.reload_from_disk()
    write(path, sim, entry("main", SLOW_LOGOUT + "  heartbeat_interval: 30\n"))
    keeper.reload_from_disk()
    await trio.sleep(60)
    (main,) = [c for c in sim.connections if c.open]
    assert main.heartbeat_interval == 30 and peak[0] == 1
    assert list(keeper.sessions) == ["main"] and keeper.sessions["main"].ready
    asked = trio.current_time()
    keeper.stop()
    await sim.wait_for(lambda: not main.open)
    assert trio.current_time() - asked < 1 and main.logged_out  # nothing hidden left to cut


async def test_a_change_then_a_removal_does_not_bring_the_account_back(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    """A pending restart reads the newest config: a removed account stays removed."""
    path = write(tmp_path / "c.yaml", sim, entry("main", SLOW_LOGOUT) + entry("hedge"))
    keeper = await keeper_on(nursery, path)
    sim.delay_next("private/logout", 2)
    write(path, sim, entry("main", SLOW_LOGOUT + "  heartbeat_interval: 20\n") + entry("hedge"))
    keeper.reload_from_disk()
    write(path, sim, entry("hedge"))
    keeper.reload_from_disk()
    await trio.sleep(60)
    assert list(keeper.sessions) == ["hedge"]
    assert not [c for c in sim.connections if c.open and c.client_id == "main-id"]


async def test_a_removal_then_a_readd_waits_for_the_old_link(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    """Removed and added back before its logout finished: the new link opens after the old."""
    path = write(tmp_path / "c.yaml", sim, entry("main", SLOW_LOGOUT) + entry("hedge"))
    keeper = await keeper_on(nursery, path)
    peak = [0]
    nursery.start_soon(most_links_at_once, sim, "main-id", peak)
    sim.delay_next("private/logout", 2)
    write(path, sim, entry("hedge"))
    keeper.reload_from_disk()
    write(path, sim, entry("main", SLOW_LOGOUT) + entry("hedge"))
    keeper.reload_from_disk()
    await trio.sleep(60)
    assert peak[0] == 1 and keeper.sessions["main"].ready
    assert sum(c.client_id == "main-id" for c in sim.connections) == 2


async def test_a_reload_before_run_or_after_stop_launches_nothing_early_or_late(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    """Before run() a reload only replaces the config; after stop() it starts nothing."""
    path = write(tmp_path / "c.yaml", sim, entry("main"))
    keeper = Keeper(load_config(path), rng=random.Random(1))
    keeper.reload(load_config(write(path, sim, entry("hedge"))))
    await nursery.start(keeper.run)
    await all_ready(keeper)
    assert list(keeper.sessions) == ["hedge"]
    keeper.stop()
    keeper.reload(load_config(write(path, sim, entry("hedge") + entry("third"))))
    await trio.sleep(10)
    assert not any(c.client_id == "third-id" for c in sim.connections)


async def test_a_sighup_during_startup_is_applied_once_sessions_run(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload signal that arrives before the sessions are launched waits for them."""
    reached, release = trio.Event(), trio.Event()

    async def slow_http(self: Keeper, nursery: trio.Nursery, http: object) -> None:
        reached.set()  # signals are handled by now: the handler starts before the endpoint
        await release.wait()

    monkeypatch.setattr(Keeper, "_start_http", slow_http)
    path = write(tmp_path / "c.yaml", sim, entry("main"), top="http: {listen: 0}\n")
    keeper = Keeper(load_config(path), rng=random.Random(1))
    nursery.start_soon(keeper.run)
    await reached.wait()
    write(path, sim, entry("main") + entry("hedge"), top="http: {listen: 0}\n")
    os.kill(os.getpid(), signal.SIGHUP)
    await trio.sleep(1)
    release.set()
    await sim.wait_for(lambda: any(c.client_id == "hedge-id" for c in sim.connections))
    await all_ready(keeper)
    assert sorted(keeper.sessions) == ["hedge", "main"]
