"""The local hop speaks Deribit: auth, ids, envelopes, relaying, subscriptions, refusals.

End to end over real sockets (test client -> keeper's gateway -> simulator), on virtual time.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator

from .conftest import SIM_ACCOUNTS, LogLines
from .gateway_support import (
    gateway_account,
    gateway_config,
    local_client,
    refused_with,
    run_keeper,
    upstream,
)

ENVELOPE = {"jsonrpc", "id", "usIn", "usOut", "usDiff", "testnet"}


def error_of(code: int) -> dict[str, object]:
    from deribit_keeper.protocol import ERROR_MESSAGES

    return {"code": code, "message": ERROR_MESSAGES[code]}


async def test_every_answer_has_deribits_envelope_and_the_clients_own_id(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Answered by the keeper or relayed: the id comes back with its JSON type, and usIn,
    usOut, usDiff, testnet are there; ids may repeat across links and restart at 1."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as one, local_client(gateway) as two:
        for client in (one, two):
            await client.call("public/hello", {"client_name": "t", "client_version": "1"}, id=1)
            await client.auth()
        local = await one.call("public/test", id="abc")
        relayed = await one.call("private/get_open_orders_by_currency", {"currency": "BTC"}, id=1)
        same_id = await two.call("private/get_open_orders_by_currency", {"currency": "ETH"}, id=1)
    for answer in (local, relayed, same_id):
        assert answer.keys() >= ENVELOPE and answer["testnet"] is True
        assert answer["usDiff"] == answer["usOut"] - answer["usIn"]
    assert local["id"] == "abc" and local["result"] == {"version": "1.2.26"}
    assert relayed["id"] == 1 and relayed["result"] == []
    assert same_id["id"] == 1 and same_id["result"] == []
    sent = [p for m, p in upstream(sim).requests if m == "private/get_open_orders_by_currency"]
    assert sent == [{"currency": "BTC"}, {"currency": "ETH"}]


async def test_local_credentials_are_checked_and_deribits_own_are_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """13004 for an unknown client or a wrong secret (Deribit's own key included), 13009 for a
    bad signature, a reused nonce or an unknown refresh token; nothing reaches the simulator."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    main = SIM_ACCOUNTS[0]
    before = list(upstream(sim).requests)
    async with local_client(keeper.gateways["main"]) as client:
        wrong: list[dict[str, Any]] = [
            {"grant_type": "client_credentials", "client_id": "engine", "client_secret": "nope"},
            {
                "grant_type": "client_credentials",
                "client_id": main.client_id,
                "client_secret": main.client_secret,
            },
            {
                "grant_type": "client_signature",
                "client_id": "engine",
                "timestamp": 1,
                "nonce": "n",
                "signature": "00",
                "data": "",
            },
            {"grant_type": "refresh_token", "refresh_token": "not-one-of-ours"},
        ]
        codes = [(await client.call("public/auth", p))["error"]["code"] for p in wrong]
        private = await client.call(
            "private/buy", {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000}
        )
        cod = await client.call("private/enable_cancel_on_disconnect")
        token = await client.call(
            "private/get_open_orders_by_currency", {"currency": "BTC", "access_token": "forged"}
        )
    assert codes == [13004, 13004, 13009, 13009]
    for answer in (private, cod, token):
        assert answer["error"] == error_of(ErrorCode.UNAUTHORIZED)
    assert upstream(sim).requests == before


async def test_signature_refresh_and_scope_work_as_on_deribit(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """client_signature with ``scope: session:NAME`` echoes the scope; the same nonce twice is
    13009; the refresh token works once; a per-request access_token of ours is accepted and
    never reaches Deribit."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as client:
        granted = await client.auth(scope="session:engine1")
        assert granted["scope"].split()[0] == "session:engine1"
        assert granted["token_type"] == "bearer" and granted["expires_in"] > 0
        renewed = await client.result(
            "public/auth",
            {"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]},
        )
        again = await client.call(
            "public/auth",
            {"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]},
        )
        assert again["error"]["code"] == ErrorCode.UNAUTHORIZED
        assert renewed["scope"] == granted["scope"]
    async with local_client(keeper.gateways["main"]) as fresh:
        orders = await fresh.call(
            "private/get_open_orders_by_currency",
            {"currency": "BTC", "access_token": renewed["access_token"]},
        )
        assert orders["result"] == []
    relayed = [p for m, p in upstream(sim).requests if m == "private/get_open_orders_by_currency"]
    assert relayed == [{"currency": "BTC"}]
    [authed, *_] = log_lines.events("gateway.client_authenticated")
    assert (authed["client_id"], authed["scope"]) == ("engine", granted["scope"])


async def test_cod_of_the_link_is_local_and_account_scope_is_relayed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Scope connection (or none) is the local link's own COD; scope account goes to Deribit."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as client:
        await client.auth()
        off = await client.result("private/get_cancel_on_disconnect")
        await client.result("private/enable_cancel_on_disconnect", {"scope": "connection"})
        on = await client.result("private/get_cancel_on_disconnect", {"scope": "connection"})
        await client.result("private/enable_cancel_on_disconnect", {"scope": "account"})
        account = await client.result("private/get_cancel_on_disconnect", {"scope": "account"})
    assert off == {"scope": "connection", "enabled": False}
    assert on == {"scope": "connection", "enabled": True}
    assert account == {"scope": "account", "enabled": True} and sim.account_cod("main-id")
    assert upstream(sim).cod_enabled  # the keeper's own connection COD was never touched


async def test_the_relaying_link_has_connection_cod_confirmed_even_with_account_scope(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """With ``cancel_on_disconnect: account`` the link that relays still confirmed COD with
    scope connection on itself before the first order went through it."""
    keeper = await run_keeper(nursery, gateway_account(sim, cancel_on_disconnect="account"))
    async with local_client(keeper.gateways["main"]) as client:
        await client.auth()
        await client.buy()
    methods = upstream(sim).requests
    confirmed = methods.index(("private/get_cancel_on_disconnect", {"scope": "connection"}))
    first_order = next(i for i, (m, _) in enumerate(methods) if m == "private/buy")
    assert confirmed < first_order and upstream(sim).cod_enabled


async def test_two_clients_on_one_channel_share_one_upstream_subscription(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """One upstream subscribe; every notification reaches both; the upstream unsubscribe
    follows the last client's unsubscribe, and each client gets Deribit's own answers."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    channel = "user.orders.any.any.raw"
    async with local_client(gateway) as one, local_client(gateway) as two:
        for client in (one, two):
            await client.auth()
            assert await client.result("private/subscribe", {"channels": [channel]}) == [channel]
        order = await one.buy()
        for client in (one, two):
            await client.wait_for(lambda c=client: len(c.notifications(channel)) >= 1)  # type: ignore[misc]
            assert client.notifications(channel)[0]["order_id"] == order["order_id"]
        assert await one.result("private/unsubscribe", {"channels": [channel]}) == [channel]
        assert await one.result("private/unsubscribe", {"channels": [channel]}) == []
        unsubscribes = [m for m, _ in upstream(sim).requests if m.endswith("unsubscribe")]
        assert unsubscribes == []
        assert await two.result("private/unsubscribe", {"channels": [channel]}) == [channel]
        await sim.wait_for(lambda: "private/unsubscribe" in upstream(sim).methods())
    subscribes = [p for m, p in upstream(sim).requests if m == "private/subscribe"]
    assert subscribes == [{"channels": [channel]}]


async def test_a_link_that_ends_leaves_its_channels(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Ticks reach a subscriber at Deribit's pace; once it goes, the upstream unsubscribes."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    ticker = "ticker.BTC-PERPETUAL.100ms"
    async with local_client(keeper.gateways["main"]) as client:
        assert await client.result("public/subscribe", {"channels": [ticker]}) == [ticker]
        await trio.sleep(1.05)
        ticks = client.notifications(ticker)
        assert 9 <= len(ticks) <= 11 and ticks[0]["instrument_name"] == "BTC-PERPETUAL"
    await sim.wait_for(lambda: "public/unsubscribe" in upstream(sim).methods())
    assert keeper.gateways["main"].fanout.channels() == []


async def test_private_channels_need_local_auth(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """The upstream connection is authenticated, but an unauthenticated local link still may
    not read the account's channels: 13778 for .raw, 13009 for private/subscribe."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as client:
        raw = await client.call("public/subscribe", {"channels": ["user.orders.any.any.raw"]})
        private = await client.call("private/subscribe", {"channels": ["user.portfolio.btc"]})
    assert raw["error"] == error_of(ErrorCode.RAW_SUBSCRIPTIONS_NOT_AVAILABLE)
    assert private["error"] == error_of(ErrorCode.UNAUTHORIZED)
    assert not any(m.endswith("subscribe") for m in upstream(sim).methods())


async def test_handshakes_elsewhere_or_past_max_clients_are_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Only /ws/api/v2 is served (404 elsewhere); one link more than max_clients gets 429."""
    keeper = await run_keeper(nursery, gateway_account(sim, gateway=gateway_config(max_clients=2)))
    gateway = keeper.gateways["main"]
    assert await refused_with(gateway, "/ws/api/v1") == 404
    async with local_client(gateway), local_client(gateway):
        assert await refused_with(gateway) == 429
    async with local_client(gateway) as client:  # room again once the others left
        assert (await client.call("public/test"))["result"] == {"version": "1.2.26"}
    assert json.dumps(gateway.snapshot())  # /status material stays serialisable


async def test_auth_none_needs_no_credentials(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """``auth: none`` (loopback only): private methods are relayed without a local auth, and
    an engine that authenticates anyway gets tokens whatever it sent."""
    open_gateway = gateway_config(clients=(), auth="none")
    keeper = await run_keeper(nursery, gateway_account(sim, gateway=open_gateway))
    async with local_client(keeper.gateways["main"]) as client:
        orders = await client.result("private/get_open_orders_by_currency", {"currency": "BTC"})
        granted = await client.result(
            "public/auth",
            {"grant_type": "client_credentials", "client_id": "x", "client_secret": "y"},
        )
    assert orders == [] and granted["token_type"] == "bearer"
