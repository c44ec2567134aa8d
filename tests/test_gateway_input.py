"""A local client that misbehaves gets Deribit's errors or a clean close, and nobody else notices.

Every test keeps a second, well-behaved link (and where it matters a second account) and checks
that it was never disturbed: same upstream connection, answers still flowing.
"""

from __future__ import annotations

import json

import trio
import trio.testing

from deribit_keeper.protocol import ERROR_MESSAGES, ErrorCode
from deribit_keeper.simulator import Simulator

from .conftest import RESEARCH, LogLines
from .gateway_support import Client, gateway_account, local_client, run_keeper, upstream


def error_of(code: int) -> dict[str, object]:
    return {"code": code, "message": ERROR_MESSAGES[code]}


async def still_fine(client: Client) -> None:
    """The bystander's link still answers, locally and through the upstream."""
    assert (await client.call("public/test"))["result"] == {"version": "1.2.26"}
    orders = await client.result("private/get_open_orders_by_currency", {"currency": "BTC"})
    assert isinstance(orders, list)


async def test_frames_that_are_not_requests_get_deribits_errors_without_an_id(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Invalid JSON, a JSON array, a frame over 32 kB: -32700, -32000, -32600, no ``id`` key;
    params of the wrong type: -32602 with the id; the link stays open."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with local_client(gateway) as bystander, local_client(gateway) as bad:
        await bystander.auth(RESEARCH)
        for raw in (
            "{not json",
            "[1, 2]",
            json.dumps({"method": "public/test", "x": "a" * 40_000}),
        ):
            await bad.ws.send_message(raw)
        await bad.ws.send_message(json.dumps({"id": 9, "method": "public/test", "params": [1]}))
        await bad.wait_for(lambda: len(bad.frames) == 4)
        codes = [f["error"]["code"] for f in bad.frames]
        assert codes == [-32700, -32000, -32600, -32602]
        assert ["id" in f for f in bad.frames] == [False, False, False, True]
        assert bad.frames[3]["id"] == 9 and bad.frames[3]["error"]["data"]["param"] == "params"
        assert bad.closed is None
        await still_fine(bystander)


async def test_a_binary_frame_is_read_as_text(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """As the simulator does: a binary frame holding a request is answered as one."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as client:
        await client.ws.send_message(json.dumps({"id": 5, "method": "public/test"}).encode())
        await client.wait_for(lambda: client.answer(5) is not None)
        assert client.answer(5) == {**client.answer(5), "result": {"version": "1.2.26"}}  # type: ignore[dict-item]


async def test_a_frame_over_a_mebibyte_closes_that_link_only(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Too big to read at all: that link is closed with 1009; the other link, the upstream
    connection and its orders are untouched."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    link = upstream(sim)
    async with local_client(gateway) as bystander, local_client(gateway) as bad:
        await bystander.auth(RESEARCH)
        kept = await bystander.buy()
        await bad.ws.send_message("x" * (2 * 1024 * 1024))
        closed = await bad.until_closed()
        assert closed.code == 1009
        await still_fine(bystander)
    assert link.open and upstream(sim) is link
    assert [o["order_id"] for o in sim.open_orders("main-id")] == [kept["order_id"]]


async def test_unknown_methods_and_bad_params_get_deribits_own_answer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """They are relayed and Deribit's errors come back unchanged: -32601, -32602, -32000."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    async with local_client(keeper.gateways["main"]) as client:
        await client.auth()
        unknown = await client.call("public/no_such_method")
        typed = await client.call(
            "private/buy", {"instrument_name": "BTC-PERPETUAL", "amount": "ten", "price": 1}
        )
        missing = await client.call("private/get_order_state")
        local = await client.call("public/set_heartbeat", {"interval": 5})
    assert unknown["error"] == error_of(ErrorCode.METHOD_NOT_FOUND)
    assert typed["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert typed["error"]["data"]["param"] == "amount"
    assert missing["error"] == error_of(ErrorCode.MISSING_PARAMS)
    assert local["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert local["error"]["data"]["param"] == "interval"
    assert upstream(sim).open


async def test_a_burst_of_a_thousand_requests_is_answered_and_disturbs_nobody(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """1,000 pipelined requests on one link: each answered once under its own id, in any order;
    meanwhile another link and another account keep being answered."""
    keeper = await run_keeper(nursery, gateway_account(sim), gateway_account(sim, "hedge"))
    async with (
        local_client(keeper.gateways["main"]) as burst,
        local_client(keeper.gateways["main"]) as bystander,
        local_client(keeper.gateways["hedge"]) as other_account,
    ):
        for client in (burst, bystander, other_account):
            await client.auth()
        params = {"currency": "BTC"}
        for request_id in range(1, 1001):
            await burst.send("private/get_open_orders_by_currency", params, id=request_id)
        await still_fine(bystander)
        await still_fine(other_account)
        await burst.wait_for(lambda: len(burst.frames) >= 1001)  # the auth answer, then 1,000
        ids = sorted(f["id"] for f in burst.frames[1:])
        assert ids == list(range(1, 1001))
        assert all(f["result"] == [] for f in burst.frames[1:])
    assert len(sim.connections) == 2 and all(c.open for c in sim.connections)
