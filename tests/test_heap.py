"""The heap is frozen when a session gets ready, and a lost link's objects are freed again.

``deribit-keeper run`` freezes the heap (``heap.py``) so that the collector's full passes skip
the links' long-lived objects; these tests run a Keeper with it on, as the CLI does, and leave
the heap thawed for the rest of the suite whatever happens.
"""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing

from deribit_keeper.config import Secret
from deribit_keeper.heap import OWED_AT_MOST_S
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import account_config, keeper_config
from .gateway_support import ready_and_listening, until, upstream


@pytest.fixture
async def keeper(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> AsyncIterator[Keeper]:
    """Two accounts ready under a Keeper that freezes the heap, as ``deribit-keeper run``
    does; the heap is thawed afterwards, whatever happened."""
    config = keeper_config(account_config(sim, "main"), account_config(sim, "hedge"))
    keeper = Keeper(config, rng=random.Random(7), freeze_heap=True)
    try:
        await nursery.start(partial(keeper.run, handle_signals=False))
        await until(keeper, ready_and_listening(keeper))
        yield keeper
    finally:
        gc.unfreeze()
        gc.enable()


def tracked(thing: object) -> bool:
    """Whether the collector's passes walk ``thing`` (frozen objects are left out)."""
    return any(o is thing for o in gc.get_objects())


async def test_once_the_accounts_are_ready_the_collector_skips_their_links(
    keeper: Keeper, sim: Simulator
) -> None:
    assert gc.get_freeze_count() > 0
    assert not tracked(keeper.sessions["main"].rpc)
    assert not tracked(keeper.sessions["hedge"].rpc)


async def test_a_lost_link_goes_back_to_the_collector_and_ready_freezes_again(
    keeper: Keeper, sim: Simulator
) -> None:
    """A reconnect must not leak the dead link: it was frozen, and sits in reference cycles
    (its tasks' frames and the error that ended it), which only the collector can free."""
    session = keeper.sessions["main"]
    dead_link = session.rpc
    first = upstream(sim, "main")
    await sim.drop(first, abrupt=True)
    await until(keeper, lambda: session.state is SessionState.BACKOFF)
    assert gc.get_freeze_count() == 0
    assert tracked(dead_link)
    await until(keeper, lambda: session.ready)
    assert gc.get_freeze_count() > 0
    assert not tracked(session.rpc)


async def test_a_lost_link_thaws_the_heap_while_the_other_accounts_stay_ready(
    keeper: Keeper, sim: Simulator
) -> None:
    sim.refuse_handshakes(1000, 503)
    await sim.drop(upstream(sim, "main"), abrupt=True)
    await until(keeper, lambda: keeper.sessions["main"].state is SessionState.BACKOFF)
    assert gc.get_freeze_count() == 0
    assert tracked(keeper.sessions["hedge"].rpc)


async def reconnect_main(keeper: Keeper, sim: Simulator) -> None:
    """Drop main's upstream link and wait until it is ready on a new one."""
    session = keeper.sessions["main"]
    before = upstream(sim, "main")
    await sim.drop(before, abrupt=True)
    await until(keeper, lambda: session.ready and upstream(sim, "main") is not before)


class Node:
    """A stand-in for a link's objects: it refers to itself, so only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_what_was_frozen_and_became_cyclic_garbage_is_freed_at_the_next_reconnect(
    keeper: Keeper, sim: Simulator
) -> None:
    """A reconnect is quicker than the collector's next full pass: were the dead link's cycles
    frozen again as the new link gets ready, each reconnect would leak them for good."""
    node = Node()
    await reconnect_main(keeper, sim)  # frozen alive, as a link's objects are
    freed = weakref.ref(node)
    del node  # now frozen garbage, in a cycle: as the link's objects once it dies
    await reconnect_main(keeper, sim)
    assert freed() is None
    assert gc.get_freeze_count() > 0


async def test_after_a_mass_disconnect_the_full_pass_waits_until_every_account_is_ready(
    keeper: Keeper, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full pass a reconnect owes stops every set-up while it runs: paid at the first
    ready of a storm, it bunched the rest (the pacer's slots that fell due meanwhile all
    started at once). It comes once every account is ready again, and still frees the dead
    links' cycles."""
    passes: list[list[bool]] = []
    collect = gc.collect

    def full_pass(*args: int) -> int:
        passes.append([s.ready for s in keeper.sessions.values()])
        return collect(*args)

    monkeypatch.setattr(gc, "collect", full_pass)
    node = Node()
    dead = [upstream(sim, "main"), upstream(sim, "hedge")]
    for conn in dead:
        await sim.drop(conn, abrupt=True)
    await until(keeper, lambda: all(s.ready for s in keeper.sessions.values()))
    freed = weakref.ref(node)
    del node  # frozen alive at the first ready: garbage in a cycle now, as a dead link is
    for conn in [upstream(sim, "main"), upstream(sim, "hedge")]:
        await sim.drop(conn, abrupt=True)
    await until(keeper, lambda: all(s.ready for s in keeper.sessions.values()))
    assert passes == [[True, True], [True, True]]
    assert freed() is None and gc.get_freeze_count() > 0 and gc.isenabled()


async def test_an_account_that_never_gets_ready_does_not_keep_the_garbage_for_ever(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """With one account refused for good, 'every account ready' never comes: the owed pass
    is paid, and the collector's automatic passes resume, ``OWED_AT_MOST_S`` after the loss."""
    wrong = account_config(sim, "hedge", client_secret=Secret("not-the-secret"))
    keeper = Keeper(
        keeper_config(account_config(sim, "main"), wrong), rng=random.Random(7), freeze_heap=True
    )
    try:
        await nursery.start(partial(keeper.run, handle_signals=False))
        await until(keeper, lambda: keeper.sessions["main"].ready)
        node = Node()
        await reconnect_main(keeper, sim)  # frozen alive, as a link's objects are
        freed = weakref.ref(node)
        del node
        await reconnect_main(keeper, sim)  # a pass is owed from this loss at the latest
        await trio.sleep(OWED_AT_MOST_S + 0.1)  # past the bound, not on it
        assert freed() is None and gc.isenabled()
        assert not keeper.sessions["hedge"].ready
    finally:
        gc.unfreeze()
        gc.enable()


async def test_the_collector_waits_while_links_set_up_and_resumes_once_all_are_ready(
    keeper: Keeper, sim: Simulator
) -> None:
    """Automatic passes over the young objects of a thousand set-ups took half the time
    until all were ready: from a loss until every account is ready again they wait."""
    assert gc.isenabled()
    await sim.drop(upstream(sim, "main"), abrupt=True)
    await until(keeper, lambda: keeper.sessions["main"].state is SessionState.BACKOFF)
    assert not gc.isenabled()
    await until(keeper, lambda: keeper.sessions["main"].ready)
    assert gc.isenabled()


async def test_a_reload_that_removes_an_account_holds_the_collector_off_no_longer_than_the_bound(
    keeper: Keeper, sim: Simulator
) -> None:
    """The removed session's stop owes a pass, and the others, ready throughout, bring no
    ready to pay it at: the collector must still resume, or a gateway's garbage would pile up
    until the next reconnect."""
    hedge = keeper.sessions["hedge"]
    keeper.reload(keeper_config(account_config(sim, "main")))
    with trio.fail_after(10):
        await hedge.stopped.wait()
    assert not gc.isenabled()
    await trio.sleep(OWED_AT_MOST_S + 0.1)  # past the bound, not on it
    assert gc.isenabled() and keeper.sessions["main"].ready


async def test_the_collector_runs_again_once_the_keeper_has_stopped(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """The last sessions' stops owe a pass that nobody is left to pay: a program that runs a
    Keeper and goes on must not inherit a collector that is off."""
    config = keeper_config(account_config(sim, "main"), account_config(sim, "hedge"))
    keeper = Keeper(config, rng=random.Random(7), freeze_heap=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(keeper.run, handle_signals=False))
            await until(keeper, ready_and_listening(keeper))
            keeper.stop()
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
