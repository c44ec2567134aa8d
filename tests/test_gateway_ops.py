"""The gateway as an operator sees it: reloads, /status, /metrics, a port already taken."""

from __future__ import annotations

import dataclasses
import random
from functools import partial

import pytest
import trio
import trio.testing

from deribit_keeper.config import LocalClient, Secret
from deribit_keeper.gateway import Gateway
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import RESEARCH, LogLines, keeper_config
from .gateway_support import (
    gateway_account,
    gateway_config,
    local_client,
    ready_and_listening,
    run_keeper,
    until,
    upstream,
)
from .test_metrics import scrape, value

NEWCOMER_SECRET = RESEARCH.client_secret.reveal()  # a secret the leak check knows


async def test_a_changed_gateway_block_restarts_the_gateway_and_keeps_the_upstream_session(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Local links close with 1012; the same upstream connection (and its COD) stays; the new
    gateway takes the new clients at once."""
    account = gateway_account(sim)
    keeper = await run_keeper(nursery, account)
    link, old = upstream(sim), keeper.gateways["main"]
    async with local_client(old) as engine:
        await engine.auth()
        order = await engine.buy()
        newcomer = LocalClient("newcomer", Secret(NEWCOMER_SECRET))
        changed = gateway_config(clients=(newcomer,))
        result = keeper.reload(keeper_config(dataclasses.replace(account, gateway=changed)))
        closed = await engine.until_closed()
    assert closed.code == 1012 and result.gateways == ("main",) and result.changed == ()
    await until(keeper, lambda: keeper.gateways.get("main", old) is not old)
    await until(keeper, ready_and_listening(keeper))
    async with local_client(keeper.gateways["main"]) as again:
        assert (
            await again.call(
                "public/auth",
                {"grant_type": "client_credentials", "client_id": "engine", "client_secret": "x"},
            )
        )["error"]["code"] == 13004
        await again.auth(newcomer)
        orders = await again.result("private/get_open_orders_by_currency", {"currency": "BTC"})
    assert [o["order_id"] for o in orders] == [order["order_id"]]  # no COD fired anywhere
    assert upstream(sim) is link and len(sim.connections) == 1


async def test_removing_and_adding_a_gateway_by_reload(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A removed gateway block stops the gateway (1001) and frees its port; added back, it
    listens again; the session is never touched."""
    account = gateway_account(sim)
    keeper = await run_keeper(nursery, account)
    async with local_client(keeper.gateways["main"]) as engine:
        keeper.reload(keeper_config(dataclasses.replace(account, gateway=None)))
        assert (await engine.until_closed()).code == 1001
    await until(keeper, lambda: "main" not in keeper.gateways)
    keeper.reload(keeper_config(account))
    await until(keeper, ready_and_listening(keeper))
    assert len(sim.connections) == 1


async def test_status_and_metrics_show_the_gateway_and_its_links(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """/status lists each link (client, local COD, open orders, channels); /metrics counts
    links, relayed requests, 13028 refusals and local COD cancellations."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as research:
        await research.auth(RESEARCH)
        await research.result("private/subscribe", {"channels": ["user.orders.any.any.raw"]})
        await research.result("private/enable_cancel_on_disconnect")
        await research.buy()
        snapshot = gateway.snapshot()
        [shown] = snapshot["links"]
        assert (shown["client_id"], shown["cod"], shown["open_orders"]) == ("research", True, 1)
        assert shown["subscriptions"] == ["user.orders.any.any.raw"]
        assert snapshot["listen"] == "127.0.0.1:0" and snapshot["port"] == gateway.port
        got = scrape(keeper.metrics)
        assert value(got, "gateway_links", account="main") == 1
        assert (
            value(
                got,
                "gateway_requests_total",
                account="main",
                method="private/buy",
                outcome="result",
            )
            == 1
        )
        await research.abort()
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    await sim.drop(upstream(sim), abrupt=True)
    sim.refuse_handshakes(5)
    async with local_client(gateway) as engine:
        await engine.auth()
        refused = await engine.call("private/get_open_orders_by_currency", {"currency": "BTC"})
        assert refused["error"]["code"] == 13028
    got = scrape(keeper.metrics)
    assert value(got, "gateway_links", account="main") == 0
    assert value(got, "gateway_unavailable_total", account="main") == 1
    assert value(got, "gateway_cod_cancelled_orders_total", account="main") == 1
    assert value(got, "gateway_cod_fired_total", account="main") == 1
    histogram = value(got, "gateway_relay_duration_seconds_count", account="main")
    assert histogram == 1  # the buy; the local COD cancel is the keeper's own request


async def test_a_port_in_use_is_retried_and_disturbs_no_other_account(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """``gateway.listen_failed`` at error, retried with a growing delay; the other account's
    gateway and both sessions run; once the port is free the gateway listens."""
    squatter = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = squatter.socket.getsockname()[1]
    taken = gateway_account(sim, gateway=gateway_config(port=port))
    keeper = Keeper(keeper_config(taken, gateway_account(sim, "hedge")), rng=random.Random(1))
    nursery.start_soon(partial(keeper.run, handle_signals=False))
    await until(keeper, lambda: len(log_lines.events("gateway.listen_failed")) >= 3)
    hedge = keeper.gateways["hedge"]
    assert hedge.port is not None and keeper.gateways["main"].port is None
    assert all(s.state is SessionState.READY for s in keeper.sessions.values())
    failures = log_lines.events("gateway.listen_failed")
    assert [f["retry_in_s"] for f in failures[:3]] == [1.0, 2.0, 4.0]
    assert all(f["level"] == "error" and f["account"] == "main" for f in failures)
    await squatter.aclose()
    await until(keeper, lambda: keeper.gateways["main"].port == port)
    async with local_client(keeper.gateways["main"]) as engine:
        assert (await engine.call("public/test"))["result"]["version"]


async def test_a_gateway_that_crashes_on_a_bug_starts_again_and_the_keeper_stays(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug escaping a gateway is logged; the sessions and the other account never notice;
    a new gateway listens a second later."""
    real_run, runs = Gateway.run, []

    async def run_with_a_bug_once(self: Gateway) -> None:
        runs.append(self.account)
        if runs.count(self.account) == 1 and self.account == "main":
            raise RuntimeError("a bug in the gateway")
        await real_run(self)

    monkeypatch.setattr(Gateway, "run", run_with_a_bug_once)
    keeper = await run_keeper(nursery, gateway_account(sim), gateway_account(sim, "hedge"))
    await until(
        keeper, lambda: "main" in keeper.gateways and keeper.gateways["main"].port is not None
    )
    [crash] = log_lines.events("gateway.unexpected_error")
    assert crash["account"] == "main" and "a bug in the gateway" in crash["exception"]
    assert runs.count("main") == 2 and len(sim.connections) == 2
    assert all(s.ready for s in keeper.sessions.values())
    async with local_client(keeper.gateways["main"]) as engine:
        assert (await engine.call("public/test"))["result"]["version"]


async def test_gateways_restarted_by_reloads_let_go_of_the_session(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Ten reloads that each restart the gateway leave the session watched by one gateway, not
    eleven: a keeper reloaded every day must not grow."""
    account = gateway_account(sim)
    keeper = await run_keeper(nursery, account)
    session = keeper.sessions["main"]

    def gateways_watching() -> tuple[int, int]:
        observers = [
            o for o in session._observers if isinstance(getattr(o, "__self__", None), Gateway)
        ]
        return len(observers), len(session._listeners)

    assert gateways_watching() == (1, 1)
    for n in range(1, 11):
        old = keeper.gateways["main"]
        changed = dataclasses.replace(account, gateway=gateway_config(max_clients=n))
        keeper.reload(keeper_config(changed))
        await until(keeper, lambda: keeper.gateways.get("main", old) is not old)  # noqa: B023
        await until(keeper, ready_and_listening(keeper))
    assert gateways_watching() == (1, 1)
