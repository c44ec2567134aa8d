"""Regression tests from the review of the gateway's HTTP face and the COD guard.

Each test failed before its fix: a dead link's local COD cancelling a reconnected client's new
REST orders; one slow COD check dropping the protected link; private methods spelt otherwise
relayed without credentials; web pages placing orders through an ``auth: none`` gateway; a cut
short POST executed; ``auth: none`` client ids growing a table without bound; a lone surrogate
logged as a gateway bug.
"""

from __future__ import annotations

import json

import trio
import trio.testing

from deribit_keeper.simulator import Simulator

from .conftest import LogLines
from .gateway_support import (
    gateway_account,
    gateway_config,
    http_call,
    http_private,
    local_client,
    run_keeper,
    until,
    upstream,
)

BUY = "instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=40000"
BUY2 = "instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=39000&label=new"


async def test_new_http_order_after_reconnect_survives(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    account = gateway_account(sim, gateway=gateway_config(cancel_on_disconnect=True))
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    port = gateway.port
    assert port is not None
    answers = []

    async def buy_slowly() -> None:
        answers.append(await http_private(port, "private/buy", BUY))

    async with local_client(gateway) as engine:
        await engine.auth()
        sim.delay_next("private/buy", 3)
        nursery.start_soon(buy_slowly)
        await sim.wait_for(lambda: "private/buy" in upstream(sim).methods())
        await engine.abort()
    # The engine comes back at once, on a new link, and goes on trading over REST.
    async with local_client(gateway) as engine2:
        await engine2.auth()
        new = await http_private(port, "private/buy", BUY2)
        assert new.status == 200, new
        new_id = new.body["result"]["order"]["order_id"]
        await until(keeper, lambda: bool(answers))
        await trio.sleep(2)
        state = {o["order_id"]: o["order_state"] for o in sim.orders("main-id")}
        # The engine is connected: its order placed after reconnecting must stay open.
        assert state[new_id] == "open", state


async def test_unauthenticated_private_method_in_another_spelling_is_not_relayed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Local auth is keyed on the literal prefix 'private/': any other spelling of a private
    method reaches Deribit over the *authenticated* upstream without any local credential.
    (Whether Deribit then runs it is Deribit's parser's business; nothing should be sent.)"""
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    for path in (
        "/api/v2/Private/buy",
        "/api/v2//private/buy",
        "/api/v2/private%2Fbuy".replace("%2F", "/"),
    ):
        await http_call(port, "GET", f"{path}?{BUY}")
    sent = [m for m in upstream(sim).methods() if "buy" in m.lower()]
    assert sent == [], sent


async def test_auth_none_client_ids_from_headers_grow_client_orders_without_bound(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """auth: none: check_signed returns whatever id a header names, unchecked, and every
    private request makes a LinkOrders for it that is never removed."""
    account = gateway_account(sim, gateway=gateway_config(auth="none", clients=()))
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    for i in range(300):
        header = f"deri-hmac-sha256 id=x{i},ts=1,sig=zz,nonce=n"
        uri = "/api/v2/private/get_open_orders_by_currency?currency=BTC"
        await http_call(gateway.port, "GET", uri, headers=(("Authorization", header),))
    assert len(gateway.client_orders) < 300, len(gateway.client_orders)


async def test_auth_none_gateway_takes_orders_from_any_web_page(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """auth: none on loopback: a plain cross-site GET (an <img src> in any page the trader's
    browser opens; no CORS preflight for a simple GET) places a real order. A browser always
    sends Origin/Sec-Fetch-Site on such requests; the gateway ignores them."""
    account = gateway_account(sim, gateway=gateway_config(auth="none", clients=()))
    keeper = await run_keeper(nursery, account)
    port = keeper.gateways["main"].port
    assert port is not None
    answer = await http_call(
        port,
        "GET",
        f"/api/v2/private/buy?{BUY}",
        headers=(("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")),
    )
    assert answer.status != 200 and not sim.open_orders("main-id"), answer


async def test_truncated_post_body_is_not_executed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A POST whose client goes away before its body is complete must not be relayed."""
    account = gateway_account(sim, gateway=gateway_config(auth="none", clients=()))
    keeper = await run_keeper(nursery, account)
    port = keeper.gateways["main"].port
    assert port is not None
    body = json.dumps(
        {"params": {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000}}
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (
        "POST /api/v2/private/buy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) + 50}\r\n\r\n"
    )
    await stream.send_all(head.encode() + body.encode())
    await trio.sleep(0.5)
    await stream.aclose()
    await trio.sleep(2)
    assert not sim.orders("main-id"), sim.orders("main-id")


async def test_a_slow_cod_check_does_not_cancel_the_book(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    account = gateway_account(sim, cod_check_interval=30.0, request_timeout=5.0)
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as engine:
        await engine.auth()
        await engine.buy()
        # Deribit takes 6 s (> request_timeout) to answer one get_cancel_on_disconnect;
        # everything else (heartbeats, test_requests) flows normally.
        sim.delay_next("private/get_cancel_on_disconnect", 6)
        await trio.sleep(40)
        state = {o["order_id"]: o.get("cancel_reason") for o in sim.orders("main-id")}
        assert sim.open_orders("main-id"), state


async def test_a_lone_surrogate_in_a_post_body_is_a_parse_error_not_a_gateway_bug(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    answer = await http_call(port, "POST", "/api/v2/public/test", body=b'{"id": "\\ud800"}')
    assert (answer.status, answer.body["error"]["code"]) == (400, -32700)
    assert not log_lines.events("gateway.unexpected_error")
