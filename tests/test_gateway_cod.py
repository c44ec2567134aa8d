"""COD on both hops, end to end: test client -> keeper's gateway -> simulator.

What is asserted is what a trading engine would see on its link, and what Deribit (the
simulator) did to the orders: cancelled by COD, or left standing.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import trio
import trio.testing

from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator

from .conftest import RESEARCH, LogLines
from .gateway_support import (
    gateway_account,
    gateway_config,
    local_client,
    ready_and_listening,
    run_keeper,
    until,
    upstream,
)


async def test_an_upstream_loss_cancels_the_orders_and_closes_every_local_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Deribit cancels what went through the lost link; the engine's links close with 1013 at
    once; the keeper is ready again and a reconnected engine finds no open order."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as engine, local_client(gateway) as research:
        await engine.auth()
        await research.auth(RESEARCH)
        order = await engine.buy()
        assert order["order_state"] == "open"
        link = upstream(sim)
        await sim.drop(link, abrupt=True)
        with trio.fail_after(1):
            closed = [await engine.until_closed(), await research.until_closed()]
    assert [(c.code, (c.reason or "").startswith("upstream lost")) for c in closed] == [
        (1013, True)
    ] * 2
    assert link.cod_fired and link.cod_cancelled == [order["order_id"]]
    [lost] = log_lines.events("gateway.upstream_lost")
    assert lost["clients_closed"] == 2
    await until(keeper, ready_and_listening(keeper))
    async with local_client(gateway) as engine:
        await engine.auth()
        assert await engine.result("private/get_open_orders_by_currency", {"currency": "BTC"}) == []
    cancelled = [o for o in sim.orders("main-id") if o["order_id"] == order["order_id"]]
    assert cancelled[0]["cancel_reason"] == "cancel_on_disconnect"


async def test_a_dead_local_link_with_local_cod_has_its_orders_cancelled_and_only_those(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """An engine that crashes (TCP gone, no close frame) with local COD on loses its open orders
    within a second; another client's orders, and the upstream link, stay."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as research:
        await research.auth(RESEARCH)
        kept = await research.buy(price=41000)
        async with local_client(gateway) as engine:
            await engine.auth()
            assert await engine.result("private/enable_cancel_on_disconnect") == "ok"
            doomed = [await engine.buy(price=p) for p in (40000, 39000)]
            filled = await engine.buy(price=60000)  # crosses the ask: filled, nothing to cancel
            assert filled["order_state"] == "filled"
            await engine.abort()
            with trio.fail_after(1):
                await sim.wait_for(lambda: len(sim.open_orders("main-id")) == 1)
    [left] = sim.open_orders("main-id")
    assert left["order_id"] == kept["order_id"]
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    for order in doomed:
        [now] = [o for o in sim.orders("main-id") if o["order_id"] == order["order_id"]]
        assert (now["order_state"], now["cancel_reason"]) == ("cancelled", "user_request")
    [fired] = log_lines.events("gateway.cod_fired")
    assert (fired["client_id"], fired["cancelled"]) == ("engine", 2)
    [gone] = log_lines.events("gateway.client_disconnected", client_id="engine")
    assert (gone["reason"], gone["open_orders"]) == ("client_closed", 2)
    assert upstream(sim).open and len(sim.connections) == 1


async def test_a_clean_close_fires_local_cod_when_the_gateway_turns_it_on_for_every_link(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """With ``cancel_on_disconnect: true`` a link starts with local COD on, and a polite close
    (as a stopping engine sends) cancels its orders too: Deribit's COD fires on any close."""
    gateway_on = gateway_config(cancel_on_disconnect=True)
    keeper = await run_keeper(nursery, gateway_account(sim, gateway=gateway_on))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        cod = await engine.result("private/get_cancel_on_disconnect", {"scope": "connection"})
        assert cod == {"scope": "connection", "enabled": True}
        await engine.buy()
    with trio.fail_after(1):
        await sim.wait_for(lambda: sim.open_orders("main-id") == [])


async def test_a_local_logout_keeps_the_orders(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """``private/logout`` gets no answer, the link closes with 1000, and local COD does not
    fire: the orders stay, as on Deribit."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        await engine.result("private/enable_cancel_on_disconnect")
        order = await engine.buy()
        logout = engine.next_id()
        await engine.send("private/logout", {}, id=logout)
        closed = await engine.until_closed()
    assert closed.code == 1000 and engine.answer(logout) is None
    await trio.sleep(5)
    assert [o["order_id"] for o in sim.open_orders("main-id")] == [order["order_id"]]
    assert log_lines.events("gateway.cod_fired") == []
    [gone] = log_lines.events("gateway.client_disconnected")
    assert gone["reason"] == "logout"


async def test_a_client_that_stops_answering_test_requests_is_closed_and_its_orders_cancelled(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """After ``public/set_heartbeat`` the keeper sends a test_request every interval; a client
    that leaves one unanswered is closed with 1000 when the next is due, and local COD fires."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"], answer_heartbeats=False) as engine:
        await engine.auth()
        await engine.result("private/enable_cancel_on_disconnect")
        assert await engine.result("public/set_heartbeat", {"interval": 10}) == "ok"
        await engine.buy()
        started = trio.current_time()
        closed = await engine.until_closed()
    assert closed.code == 1000
    assert 19 <= trio.current_time() - started <= 21  # sent at 10 s, unanswered at 20 s
    assert engine.test_requests == 1
    with trio.fail_after(1):
        await sim.wait_for(lambda: sim.open_orders("main-id") == [])
    [gone] = log_lines.events("gateway.client_disconnected")
    assert gone["reason"] == "heartbeat_missed"


async def test_a_client_that_answers_test_requests_stays(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """An hour of local heartbeats, each answered with public/test: the link stays open."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.result("public/set_heartbeat", {"interval": 10})
        await trio.sleep(3605)
        assert engine.closed is None and engine.test_requests == 360


async def test_a_request_while_the_upstream_is_down_is_refused_at_once_and_never_sent_later(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """13028 at once; nothing queued: the order never reaches Deribit, even once ready again."""
    slow = dataclasses.replace(gateway_account(sim).backoff, initial=5.0, max=5.0)
    keeper = await run_keeper(nursery, gateway_account(sim, backoff=slow))
    sim.refuse_handshakes(3)
    await sim.drop(upstream(sim), abrupt=True)
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()  # the gateway itself answers auth, upstream or not
        asked = trio.current_time()
        answer = await engine.call("private/buy", {"instrument_name": "BTC-PERPETUAL",
                                                    "amount": 10, "price": 40000})  # fmt: skip
        assert trio.current_time() == asked
        assert answer["error"] == {"code": ErrorCode.TEMPORARILY_UNAVAILABLE,
                                   "message": "temporarily_unavailable"}  # fmt: skip
        await until(keeper, ready_and_listening(keeper))
        assert engine.closed is None  # it joined during the outage: nothing of it was lost
        await trio.sleep(30)
    assert all("private/buy" not in c.methods() for c in sim.connections)
    assert sim.orders("main-id") == []


async def test_sigterm_with_close_lets_deribit_cancel_the_gateways_orders(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """``on_shutdown: close``: local links close with 1001, the upstream link drops, and
    Deribit's COD cancels what the engine placed."""
    keeper = await run_keeper(nursery, gateway_account(sim, on_shutdown="close"), signals=True)
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        await engine.buy()
        link = upstream(sim)
        os.kill(os.getpid(), signal.SIGTERM)
        closed = await engine.until_closed()
    assert closed.code == 1001
    await sim.wait_for(lambda: not link.open)
    assert link.cod_fired and sim.open_orders("main-id") == []


async def test_sigterm_with_logout_keeps_the_gateways_orders(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
) -> None:
    """``on_shutdown: logout``: the upstream logs out, COD does not fire, the orders stay."""
    keeper = await run_keeper(nursery, gateway_account(sim, on_shutdown="logout"), signals=True)
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        order = await engine.buy()
        link = upstream(sim)
        os.kill(os.getpid(), signal.SIGTERM)
        await engine.until_closed()
    await sim.wait_for(lambda: not link.open)
    assert link.logged_out and not link.cod_fired
    assert [o["order_id"] for o in sim.open_orders("main-id")] == [order["order_id"]]


async def test_an_order_still_unanswered_when_its_link_dies_is_cancelled_too(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The engine crashes between sending a buy and its answer: local COD waits for the answer,
    learns the order's id from it, and cancels it."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        await engine.result("private/enable_cancel_on_disconnect")
        sim.delay_next("private/buy", 0.3)
        params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000}
        await engine.send("private/buy", params, id=77)
        await sim.wait_for(lambda: "private/buy" in upstream(sim).methods())
        await engine.abort()
    with trio.fail_after(1):
        await sim.wait_for(lambda: bool(sim.orders("main-id")) and not sim.open_orders("main-id"))
    [order] = sim.orders("main-id")
    assert order["order_state"] == "cancelled"
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    [fired] = log_lines.events("gateway.cod_fired")
    assert fired["cancelled"] == 1


async def test_local_cod_sends_its_cancels_a_few_at_a_time(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Twenty open orders, each cancel taking Deribit a second: they go eight at a time (a
    burst could meet Deribit's rate limit, whose 10028 would end the session for every link),
    and all twenty end cancelled."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth()
        await engine.result("private/enable_cancel_on_disconnect")
        for n in range(20):
            await engine.buy(price=30_000 + n)
        sim.delay_next("private/cancel", 1.0, times=20)
        await engine.abort()
        died = trio.current_time()
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    assert 3 <= trio.current_time() - died < 4  # three rounds of at most eight
    assert sim.open_orders("main-id") == []
    assert log_lines.events("gateway.cod_fired")[0]["cancelled"] == 20


async def test_a_cod_repair_that_fails_closes_the_local_links_as_an_upstream_loss(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """The COD guard finds COD off and cannot get it confirmed: the link is lost from
    enabling_cod, not from ready, and its orders and subscriptions went with it all the same,
    so the engine's links are closed with 1013 and it resyncs."""
    keeper = await run_keeper(nursery, gateway_account(sim, cod_check_interval=5))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as engine:
        await engine.auth()
        await engine.result("public/subscribe", {"channels": ["ticker.BTC-PERPETUAL.100ms"]})
        sim.misreport_cod(times=2)  # the check finds it off; the repair's confirm too
        with trio.fail_after(10):
            closed = await engine.until_closed()
    assert closed.code == 1013
    [lost] = log_lines.events("session.lost")
    assert lost["state"] == "enabling_cod"
    assert log_lines.events("gateway.upstream_lost")
    await until(keeper, ready_and_listening(keeper))
    assert gateway.fanout.channels() == []
