"""``on_start: cancel_all``: orders an earlier run left are cancelled before the account is ready,
once per process: not after a reconnect, nor after a reload of other accounts.

"An earlier run" is a bare client of the same account that placed resting orders with COD off and
went away: its orders stay on the simulator's book, as a crashed process's may on Deribit's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio
import trio.testing

from deribit_keeper.config import load_config
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.session import Session, SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import SIM_ACCOUNTS, LogLines, account_config, keeper_config
from .test_reload import entry, keeper_on, write
from .test_session import next_ready, until_state
from .test_simulator import connect
from .test_supervisor import all_ready

CANCEL_ALL = "private/cancel_all"


async def leave_orders(sim: Simulator, name: str, count: int) -> list[str]:
    """Place ``count`` resting buys for account ``name`` from a client that then goes away."""
    account = next(a for a in SIM_ACCOUNTS if a.name == name)
    ids = []
    async with connect(sim) as client:
        await client.auth(account.client_id, account.client_secret)
        for i in range(count):
            params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000 - i}
            ids.append((await client.result("private/buy", params))["order"]["order_id"])
    assert [o["order_id"] for o in sim.open_orders(account.client_id)][-count:] == ids
    return ids


def open_ids(sim: Simulator, name: str) -> list[str]:
    return [o["order_id"] for o in sim.open_orders(f"{name}-id")]


def start(nursery: trio.Nursery, sim: Simulator, **overrides: Any) -> Session:
    session = Session(account_config(sim, **overrides), rng=random.Random(7), cancel_all_first=True)
    nursery.start_soon(session.run)
    return session


def open_orders_at_ready(session: Session, sim: Simulator) -> list[int]:
    """How many orders the account had open at each session.ready, filled in as they come."""
    seen: list[int] = []

    def at_ready(s: Session, event: str, _fields: Any) -> None:
        if event == "session.ready":
            seen.append(len(sim.open_orders(s.account.client_id)))

    session.watch(at_ready)
    return seen


async def test_orders_left_by_an_earlier_run_are_cancelled_before_ready(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """cancel_all goes after COD is confirmed and before READY: nothing is ready while they rest."""
    left = await leave_orders(sim, "main", 3)
    session = Session(account_config(sim), rng=random.Random(7), cancel_all_first=True)
    at_ready = open_orders_at_ready(session, sim)
    nursery.start_soon(session.run)
    await until_state(session, SessionState.READY)
    assert at_ready == [0]
    assert {o["order_id"]: o["cancel_reason"] for o in sim.orders("main-id")} == {
        order_id: "user_request" for order_id in left
    }
    conn = sim.connections[-1]
    assert conn.methods()[3:6] == [
        "private/get_cancel_on_disconnect",
        CANCEL_ALL,
        "public/set_heartbeat",
    ]
    (done,) = log_lines.events("session.start_cancel_all")
    assert (done["cancelled"], done["level"], done["account"]) == (3, "info", "main")
    names = log_lines.names(account="main")
    assert names.index("session.start_cancel_all") < names.index("session.ready")


async def test_a_later_reconnect_cancels_nothing(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The start cancel is done once per session: a dropped link comes back leaving orders be."""
    session = start(nursery, sim)
    await until_state(session, SessionState.READY)
    kept = await leave_orders(sim, "main", 2)
    await sim.drop(sim.connections[0])
    second = await next_ready(session, sim, 2)  # the bare client was connection number 2
    assert CANCEL_ALL not in second.methods()
    assert open_ids(sim, "main") == kept
    (done,) = log_lines.events("session.start_cancel_all")
    assert done["cancelled"] == 0


async def test_a_failed_cancel_all_is_retried_before_ready(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """A refused cancel_all fails the set-up: backoff, a fresh link, and it is tried again."""
    await leave_orders(sim, "main", 2)
    sim.fail_next(CANCEL_ALL, ErrorCode.TEMPORARILY_UNAVAILABLE)
    session = Session(account_config(sim), rng=random.Random(7), cancel_all_first=True)
    at_ready = open_orders_at_ready(session, sim)
    nursery.start_soon(session.run)
    with trio.fail_after(60):
        await next_ready(session, sim, 2)
    (lost,) = log_lines.events("session.lost")
    assert (lost["reason"], lost["code"], lost["state"]) == ("rpc_error", 13028, "enabling_cod")
    assert [CANCEL_ALL in c.methods() for c in sim.connections[1:]] == [True, True]
    assert at_ready == [0]  # never ready with them open, ready once they were gone
    (done,) = log_lines.events("session.start_cancel_all")
    assert done["cancelled"] == 2


async def test_on_start_keep_cancels_nothing(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The default leaves an earlier run's orders where they are."""
    left = await leave_orders(sim, "main", 2)
    keeper = Keeper(keeper_config(account_config(sim)), rng=random.Random(1))
    await nursery.start(keeper.run)
    await all_ready(keeper)
    assert open_ids(sim, "main") == left
    assert all(CANCEL_ALL not in c.methods() for c in sim.connections)
    assert not log_lines.events("session.start_cancel_all")


async def test_the_keeper_cancels_at_each_accounts_first_start_only(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """At process start, then for an account a reload adds; never for one a reload restarts or
    leaves alone, nor for an account that chose keep."""
    cancel = "  on_start: cancel_all\n"
    await leave_orders(sim, "main", 2)
    hedge_left = await leave_orders(sim, "hedge", 1)
    path = write(tmp_path / "c.yaml", sim, entry("main", cancel) + entry("hedge"))
    keeper = await keeper_on(nursery, path)
    assert open_ids(sim, "main") == [] and open_ids(sim, "hedge") == hedge_left
    assert [e["account"] for e in log_lines.events("session.start_cancel_all")] == ["main"]

    main_left = await leave_orders(sim, "main", 1)
    third_left = await leave_orders(sim, "third", 2)
    # hedge changed (restarted), third added: only third does its first start cancel.
    write(
        path,
        sim,
        entry("main", cancel)
        + entry("hedge", "  heartbeat_interval: 20\n")
        + entry("third", cancel),
    )
    keeper.reload_from_disk()
    await trio.sleep(5)  # restarted sessions are swapped in: all_ready watches those in place
    await all_ready(keeper)
    assert open_ids(sim, "third") == [] and len(third_left) == 2
    assert open_ids(sim, "main") == main_left

    # main changed: its new session is not its first in this process.
    write(
        path,
        sim,
        entry("main", cancel + "  heartbeat_interval: 20\n")
        + entry("hedge", "  heartbeat_interval: 20\n")
        + entry("third", cancel),
    )
    old_main = keeper.sessions["main"]
    keeper.reload_from_disk()
    await old_main.stopped.wait()
    await trio.sleep(5)  # the relaunch follows the old session's end
    await all_ready(keeper)
    assert keeper.sessions["main"] is not old_main
    assert open_ids(sim, "main") == main_left and open_ids(sim, "hedge") == hedge_left
    done = log_lines.events("session.start_cancel_all")
    assert [(e["account"], e["cancelled"]) for e in done] == [("main", 2), ("third", 2)]


async def test_an_account_that_never_got_ready_still_cancels_when_a_reload_fixes_it(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """The start cancel is owed until the account's first READY, across a reload's restart."""
    left = await leave_orders(sim, "main", 1)
    wrong = entry("main", "  on_start: cancel_all\n").replace(
        "main-SECRET-do-not-log", "main-SECRET-do-not-log-wrong"
    )
    path = write(tmp_path / "c.yaml", sim, wrong)
    keeper = Keeper(load_config(path), rng=random.Random(1))
    await nursery.start(keeper.run)
    await trio.sleep(10)  # refused as invalid credentials, retried in backoff
    assert keeper.sessions["main"].state is not SessionState.READY
    assert open_ids(sim, "main") == left
    write(path, sim, entry("main", "  on_start: cancel_all\n"))
    keeper.reload_from_disk()
    await trio.sleep(1)
    await all_ready(keeper)
    assert open_ids(sim, "main") == []
    assert [e["cancelled"] for e in log_lines.events("session.start_cancel_all")] == [1]
