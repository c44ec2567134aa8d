"""Deribit's HTTP API on the gateway's port, end to end: REST client -> keeper -> simulator.

What matters to a REST client (ccxt trades only so) is that its orders are created on the
keeper's COD-protected upstream connection, that its credentials are checked as Deribit checks
them, and that its answers look like Deribit's. What matters to the trader is what the simulator
did to the orders when a hop died.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import trio
import trio.testing

from deribit_keeper.config import LocalClient
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator

from .conftest import ENGINE, RESEARCH, LogLines
from .gateway_support import (
    HttpAnswer,
    gateway_account,
    gateway_config,
    hmac_header,
    http_call,
    http_private,
    local_client,
    run_keeper,
    until,
    upstream,
)

BUY = "instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=40000&label=rest-1"


def error_code(answer: HttpAnswer) -> int:
    assert answer.status == 400, answer
    code: int = answer.body["error"]["code"]
    return code


async def http_token(port: int, client: LocalClient = ENGINE) -> str:
    """An access token from ``public/auth`` over HTTP, with client_credentials."""
    secret = client.client_secret.reveal()
    query = f"grant_type=client_credentials&client_id={client.client_id}&client_secret={secret}"
    answer = await http_call(port, "GET", f"/api/v2/public/auth?{query}")
    assert answer.status == 200 and answer.body["result"]["token_type"] == "bearer", answer
    token: str = answer.body["result"]["access_token"]
    return token


def placed(answer: HttpAnswer) -> dict[str, Any]:
    assert answer.status == 200, answer
    order: dict[str, Any] = answer.body["result"]["order"]
    return order


async def test_an_order_placed_over_http_is_made_on_the_protected_link_and_cancelled_by_cod(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A deri-hmac-sha256 GET places the order on the keeper's upstream connection (so Deribit's
    COD covers it), a WebSocket link watching user.orders sees it, and aborting the upstream
    link cancels it by COD."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    async with local_client(gateway) as watcher:
        await watcher.auth()
        channel = "user.orders.BTC-PERPETUAL.raw"
        await watcher.result("private/subscribe", {"channels": [channel]})
        answer = await http_private(gateway.port, "private/buy", BUY)
        order = placed(answer)
        assert set(answer.body) == {"jsonrpc", "result", "usIn", "usOut", "usDiff", "testnet"}
        assert (order["amount"], order["price"], order["label"]) == (10, 40000, "rest-1")
        link = upstream(sim)
        assert [o["order_id"] for o in sim.orders("main-id", conn=link)] == [order["order_id"]]
        await watcher.wait_for(lambda: bool(watcher.notifications(channel)))
        assert watcher.notifications(channel)[0]["order_id"] == order["order_id"]
        await sim.drop(link, abrupt=True)
        await watcher.until_closed()
    [now] = sim.orders("main-id")
    assert (now["order_state"], now["cancel_reason"]) == ("cancelled", "cancel_on_disconnect")


async def test_a_clients_http_orders_go_with_its_last_link_when_local_cod_is_configured(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """gateway.cancel_on_disconnect: the engine's link dies; its HTTP-placed and WebSocket-placed
    orders are cancelled within a second, in one gateway.cod_fired; research's orders stay."""
    account = gateway_account(sim, gateway=gateway_config(cancel_on_disconnect=True))
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    port = gateway.port
    async with local_client(gateway) as research:
        await research.auth(RESEARCH)
        kept = [
            await research.buy(price=30000),
            placed(await http_private(port, "private/buy", BUY, client=RESEARCH)),
        ]
        async with local_client(gateway) as engine:
            await engine.auth()
            doomed = [
                await engine.buy(price=31000),
                placed(await http_private(port, "private/buy", BUY)),
            ]
            assert gateway.snapshot()["http_open_orders"] == {"engine": 1, "research": 1}
            await engine.abort()
            with trio.fail_after(1):
                await sim.wait_for(lambda: len(sim.open_orders("main-id")) == 2)
        assert {o["order_id"] for o in sim.open_orders("main-id")} == {o["order_id"] for o in kept}
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    [fired] = log_lines.events("gateway.cod_fired")
    assert (fired["client_id"], fired["cancelled"]) == ("engine", len(doomed))


async def test_http_orders_stay_while_the_client_has_another_link_or_logs_out(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Only the client's *last* link takes its HTTP orders along, and a logout takes nothing."""
    account = gateway_account(sim, gateway=gateway_config(cancel_on_disconnect=True))
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    async with local_client(gateway) as second:
        await second.auth()
        async with local_client(gateway) as first:
            await first.auth()
            order = placed(await http_private(gateway.port, "private/buy", BUY))
            await first.abort()
        await trio.sleep(2)
        assert [o["order_id"] for o in sim.open_orders("main-id")] == [order["order_id"]]
        await second.send("private/logout", {}, id=1)
        await second.until_closed()
    await trio.sleep(2)
    assert [o["order_id"] for o in sim.open_orders("main-id")] == [order["order_id"]]


async def test_bad_credentials_get_deribits_errors_and_nothing_is_forwarded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Wrong signature, stale timestamp, reused nonce, unknown id, missing header, a Bearer
    token of another gateway: HTTP 400 with 13009 (13004 for the unknown id), and the simulator
    sees no private/buy."""
    other = dataclasses.replace(gateway_account(sim, "hedge"), gateway=gateway_config())
    keeper = await run_keeper(nursery, gateway_account(sim), other)
    port, other_port = keeper.gateways["main"].port, keeper.gateways["hedge"].port
    assert port is not None and other_port is not None
    uri = f"/api/v2/private/buy?{BUY}"
    impostor = dataclasses.replace(ENGINE, client_secret=RESEARCH.client_secret)
    stranger = dataclasses.replace(ENGINE, client_id="stranger")
    reused = hmac_header(ENGINE, "GET", uri, nonce="once")
    stale = hmac_header(ENGINE, "GET", uri, timestamp=int(time.time() * 1000) - 60_000)
    foreign = f"Bearer {await http_token(other_port)}"
    assert placed(await http_call(port, "GET", uri, headers=(("Authorization", reused),)))
    cases = {
        "wrong signature": (hmac_header(impostor, "GET", uri), ErrorCode.UNAUTHORIZED),
        "signed for another uri": (hmac_header(ENGINE, "GET", uri + "0"), ErrorCode.UNAUTHORIZED),
        "stale timestamp": (stale, ErrorCode.UNAUTHORIZED),
        "reused nonce": (reused, ErrorCode.UNAUTHORIZED),
        "unknown client id": (hmac_header(stranger, "GET", uri), ErrorCode.INVALID_CREDENTIALS),
        "another gateway's token": (foreign, ErrorCode.UNAUTHORIZED),
        "garbled header": ("deri-hmac-sha256 id=engine", ErrorCode.UNAUTHORIZED),
        "another scheme": ("Basic ZW5naW5lOnNlY3JldA==", ErrorCode.UNAUTHORIZED),
    }
    for why, (header, code) in cases.items():
        answer = await http_call(port, "GET", uri, headers=(("Authorization", header),))
        assert error_code(answer) == code, why
    assert error_code(await http_call(port, "GET", uri)) == ErrorCode.UNAUTHORIZED
    assert upstream(sim).methods().count("private/buy") == 1
    assert len(sim.orders("main-id")) == 1


async def test_tokens_of_the_gateway_work_over_http_and_never_reach_deribit(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """A token from a WebSocket auth works as ``Bearer`` and as ``access_token``; public/auth
    over HTTP issues the gateway's own tokens; none of them is sent upstream."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    async with local_client(gateway) as engine:
        ws_token = (await engine.auth())["access_token"]
    local_token = await http_token(gateway.port)
    listing = "/api/v2/private/get_open_orders_by_currency?currency=BTC"
    for header in (f"Bearer {ws_token}", f"Bearer {local_token}"):
        answer = await http_call(gateway.port, "GET", listing, headers=(("Authorization", header),))
        assert (answer.status, answer.body["result"]) == (200, [])
    answer = await http_call(gateway.port, "GET", f"{listing}&access_token={local_token}")
    assert (answer.status, answer.body["result"]) == (200, [])
    sent = json.dumps(upstream(sim).requests)
    assert ws_token not in sent and local_token not in sent


async def test_websocket_only_methods_are_refused_over_http_and_cod_scope_account_is_relayed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    for method, query in [
        ("public/set_heartbeat", "interval=10"),
        ("public/subscribe", "channels=ticker.BTC-PERPETUAL.100ms"),
        ("private/subscribe", "channels=user.orders.any.any.raw"),
        ("private/enable_cancel_on_disconnect", ""),
        ("private/get_cancel_on_disconnect", "scope=connection"),
        ("private/logout", ""),
    ]:
        answer = await http_private(port, method, query)
        assert error_code(answer) == ErrorCode.METHOD_NOT_FOUND, method
    answer = await http_private(port, "private/get_cancel_on_disconnect", "scope=account")
    assert answer.body["result"] == {"scope": "account", "enabled": False}
    assert "private/get_cancel_on_disconnect" in upstream(sim).methods()


async def test_post_with_a_json_rpc_body_echoes_its_id_and_hello_and_test_are_local(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 42, "method": "private/buy",
         "params": {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000}}
    )  # fmt: skip
    auth = hmac_header(ENGINE, "POST", "/api/v2", body)
    answer = await http_call(
        port, "POST", "/api/v2", body=body.encode(), headers=(("Authorization", auth),)
    )
    assert answer.status == 200 and answer.body["id"] == 42
    assert answer.body["result"]["order"]["order_state"] == "open"
    before = len(upstream(sim).requests)
    hello = await http_call(port, "GET", "/api/v2/public/hello?client_name=x&client_version=1")
    test = await http_call(port, "GET", "/api/v2/public/test")
    assert hello.body["result"] == test.body["result"] == {"version": "1.2.26"}
    assert "id" not in hello.body and len(upstream(sim).requests) == before


async def test_http_requests_while_the_upstream_is_down_get_13028_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    sim.refuse_handshakes(1000)
    await sim.drop(upstream(sim), abrupt=True)
    await until(keeper, lambda: not keeper.sessions["main"].ready)
    answer = await http_private(gateway.port, "private/buy", BUY)
    assert error_code(answer) == ErrorCode.TEMPORARILY_UNAVAILABLE
    assert sim.orders("main-id") == []


async def test_bad_http_input_gets_clean_errors_and_the_gateway_goes_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Unknown methods (Deribit's own -32601), bad JSON, a body over 32 kB, a wrong HTTP method,
    another path, params of the wrong type: each gets its error, and a valid request still works."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    assert (
        error_code(await http_call(port, "GET", "/api/v2/public/no_such_method"))
        == ErrorCode.METHOD_NOT_FOUND
    )
    assert (
        error_code(await http_call(port, "POST", "/api/v2", body=b"{nope")) == ErrorCode.PARSE_ERROR
    )
    huge = json.dumps({"method": "public/test", "params": {"pad": "x" * 40_000}}).encode()
    assert (
        error_code(await http_call(port, "POST", "/api/v2", body=huge))
        == ErrorCode.REQUEST_TOO_LARGE
    )
    assert error_code(await http_call(port, "GET", "/api/v2")) == ErrorCode.METHOD_NOT_FOUND
    bad_amount = await http_private(
        port, "private/buy", "instrument_name=BTC-PERPETUAL&amount=ten&price=1"
    )
    assert error_code(bad_amount) == ErrorCode.INVALID_PARAMS
    assert (await http_call(port, "DELETE", "/api/v2/public/test")).status == 405
    assert (await http_call(port, "GET", "/elsewhere")).status == 404
    assert placed(await http_private(port, "private/buy", BUY))["order_state"] == "open"


async def test_an_http_order_still_unanswered_when_the_last_link_dies_is_cancelled_too(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Deribit is slow to answer an HTTP buy; the client's link dies meanwhile: once the answer
    names the order, local COD cancels it."""
    account = gateway_account(sim, gateway=gateway_config(cancel_on_disconnect=True))
    keeper = await run_keeper(nursery, account)
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    port = gateway.port
    answers: list[HttpAnswer] = []

    async def buy_slowly() -> None:
        answers.append(await http_private(port, "private/buy", BUY))

    async with local_client(gateway) as engine:
        await engine.auth()
        sim.delay_next("private/buy", 3)
        nursery.start_soon(buy_slowly)
        await sim.wait_for(lambda: "private/buy" in upstream(sim).methods())
        await engine.abort()
    with trio.fail_after(5):
        await sim.wait_for(lambda: bool(sim.orders("main-id")) and not sim.open_orders("main-id"))
    await until(keeper, lambda: bool(answers))
    [order] = sim.orders("main-id")
    assert placed(answers[0])["order_id"] == order["order_id"]
    assert order["cancel_reason"] == "user_request"
