"""Tests of the simulator's exchange: orders, subscriptions, tickers and Cancel On Disconnect.

Like tests/test_simulator.py (whose raw client they reuse), these speak JSON over real loopback
sockets and assert what a Deribit client would see on the wire; all run on Trio's autojump clock
with a wall clock that moves with it. The simulated book is fixed: BTC-PERPETUAL bid 49995 ask
50005 (tick 0.5), ETH-PERPETUAL bid 2999.5 ask 3000.5 (tick 0.05).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from deribit_keeper.simulator import Simulator

from .test_simulator import Client, connect, start, wall

BTC = "BTC-PERPETUAL"
ETH = "ETH-PERPETUAL"
ANY_ORDERS = "user.orders.any.any.raw"
BTC_ORDERS = f"user.orders.{BTC}.raw"
ORDER_KEYS = {
    "order_id",
    "order_state",
    "order_type",
    "instrument_name",
    "direction",
    "price",
    "amount",
    "contracts",
    "filled_amount",
    "average_price",
    "label",
    "time_in_force",
    "post_only",
    "reduce_only",
    "api",
    "web",
    "max_show",
    "replaced",
    "mmp",
    "risk_reducing",
    "is_liquidation",
    "creation_timestamp",
    "last_update_timestamp",
}
TRADE_KEYS = {"trade_id", "price", "amount", "direction", "order_id", "instrument_name"}
TRADE_KEYS |= {"timestamp", "fee", "liquidity"}
PRIVATE_TRADING = [
    "private/buy",
    "private/sell",
    "private/edit",
    "private/cancel",
    "private/cancel_all",
    "private/cancel_all_by_currency",
    "private/cancel_all_by_instrument",
    "private/cancel_by_label",
    "private/get_order_state",
    "private/get_open_orders_by_currency",
    "private/get_open_orders_by_instrument",
    "private/get_open_orders",
    "private/get_positions",
    "private/subscribe",
    "private/unsubscribe",
    "private/unsubscribe_all",
]


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Simulator:
    return await start(nursery)


def limit(price: float, amount: float = 10, instrument: str = BTC, **extra: Any) -> dict[str, Any]:
    """Params of a limit order."""
    return {"instrument_name": instrument, "amount": amount, "price": price, **extra}


async def place(client: Client, price: float, side: str = "buy", **kwargs: Any) -> dict[str, Any]:
    """Place a limit order and return its order object."""
    result = await client.result(f"private/{side}", limit(price, **kwargs))
    order: dict[str, Any] = result["order"]
    return order


async def notification(client: Client, channel: str | None = None) -> dict[str, Any]:
    """The next subscription notification (on ``channel``, if given), set-aside frames first."""
    while True:
        for index, frame in enumerate(client.notifications):
            if frame.get("method") == "subscription" and channel in (
                None,
                frame["params"]["channel"],
            ):
                del client.notifications[index]
                return frame
        client.notifications.append(await client.recv())


async def data_on(client: Client, channel: str) -> Any:
    """The data of the next notification on ``channel``."""
    return (await notification(client, channel))["params"]["data"]


async def assert_quiet(client: Client, seconds: float = 1.0) -> None:
    """No subscription notification is waiting, and no frame arrives for ``seconds``."""
    assert [f for f in client.notifications if f.get("method") == "subscription"] == []
    with trio.move_on_after(seconds):
        frame = await client.recv()
        pytest.fail(f"unexpected frame {frame}")


async def subscribe(client: Client, *channels: str) -> None:
    assert await client.result("private/subscribe", {"channels": list(channels)}) == list(channels)


async def enable_cod(client: Client) -> None:
    assert await client.result("private/enable_cancel_on_disconnect") == "ok"


# Market data ----------------------------------------------------------------------------------


async def test_get_instruments_lists_the_perpetuals_like_deribit(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """public/get_instruments answers both perpetuals for any, one per currency, none expired."""
    async with connect(sim) as client:
        every = await client.result("public/get_instruments", {"currency": "any"})
        btc = await client.result("public/get_instruments", {"currency": "BTC", "kind": "future"})
        usdc = await client.result("public/get_instruments", {"currency": "USDC"})
        options = await client.result(
            "public/get_instruments", {"currency": "BTC", "kind": "option"}
        )
        expired = await client.result(
            "public/get_instruments", {"currency": "ETH", "expired": True}
        )
        error = await client.error("public/get_instruments", {"currency": "DOGE"})
    assert [i["instrument_name"] for i in every] == [BTC, ETH]
    assert [i["instrument_name"] for i in btc] == [BTC]
    assert usdc == options == expired == []
    assert error["data"]["param"] == "currency"
    perpetual = btc[0]
    assert perpetual["kind"] == "future"
    assert perpetual["settlement_period"] == "perpetual"
    assert (perpetual["base_currency"], perpetual["quote_currency"]) == ("BTC", "USD")
    assert (perpetual["tick_size"], perpetual["contract_size"]) == (0.5, 10.0)
    assert perpetual["min_trade_amount"] == 10.0
    assert perpetual["expiration_timestamp"] == 32503708800000
    assert perpetual["price_index"] == "btc_usd"
    assert perpetual["is_active"] is True
    assert (every[1]["tick_size"], every[1]["contract_size"]) == (0.05, 1.0)


async def test_get_currencies_lists_btc_and_eth(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """public/get_currencies answers one entry per settlement currency."""
    async with connect(sim) as client:
        currencies = await client.result("public/get_currencies")
    assert [c["currency"] for c in currencies] == ["BTC", "ETH"]
    assert {"currency_long", "fee_precision", "withdrawal_fee"} <= set(currencies[0])


# Placing orders -------------------------------------------------------------------------------


async def test_buy_below_the_ask_rests_open_in_deribits_shape(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A buy below the ask answers {order, trades: []} with the order open and every field."""
    async with connect(sim) as client:
        await client.auth()
        result = await client.result("private/buy", limit(49000, 20, label="mine"))
    order = result["order"]
    assert result["trades"] == []
    assert set(order) == ORDER_KEYS
    assert order["order_id"] == "BTC-1"
    assert order["order_state"] == "open"
    assert (order["order_type"], order["direction"]) == ("limit", "buy")
    assert (order["instrument_name"], order["price"], order["amount"]) == (BTC, 49000, 20)
    assert (order["contracts"], order["max_show"]) == (2, 20)
    assert (order["filled_amount"], order["average_price"]) == (0, 0)
    assert (order["label"], order["time_in_force"]) == ("mine", "good_til_cancelled")
    assert (order["post_only"], order["reduce_only"], order["replaced"]) == (False, False, False)
    assert (order["api"], order["web"], order["is_liquidation"]) == (True, False, False)
    assert order["creation_timestamp"] == order["last_update_timestamp"]
    assert abs(order["creation_timestamp"] - wall() * 1000) < 5
    assert sim.open_orders("id1") == [order]


async def test_buy_at_or_above_the_ask_fills_at_once_at_the_ask(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A buy priced through the ask fills in full at the ask, with one taker trade."""
    async with connect(sim) as client:
        await client.auth()
        result = await client.result("private/buy", limit(51000, 30))
    order, (trade,) = result["order"], result["trades"]
    assert order["order_state"] == "filled"
    assert (order["filled_amount"], order["average_price"], order["price"]) == (30, 50005, 51000)
    assert set(trade) >= TRADE_KEYS
    assert (trade["price"], trade["amount"], trade["direction"]) == (50005, 30, "buy")
    assert (trade["order_id"], trade["instrument_name"]) == (order["order_id"], BTC)
    assert (trade["fee"], trade["liquidity"]) == (0, "T")
    assert trade["timestamp"] == order["last_update_timestamp"]
    assert sim.open_orders("id1") == []
    assert sim.orders("id1") == [order]


async def test_sell_at_or_below_the_bid_fills_at_the_bid(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A sell priced at the bid fills at the bid; one above it rests."""
    async with connect(sim) as client:
        await client.auth()
        filled = await client.result("private/sell", limit(2999.5, 3, ETH))
        resting = await place(client, 2999.55, "sell", instrument=ETH)
    assert filled["order"]["order_state"] == "filled"
    assert filled["trades"][0]["price"] == 2999.5
    assert resting["order_state"] == "open"


async def test_order_ids_are_prefixed_by_currency_and_counted_simulator_wide(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """Order ids are BTC-n or ETH-n with one counter shared by every account."""
    async with connect(sim) as first, connect(sim) as other:
        await first.auth()
        await other.auth("id2", "other-secret")
        ids = [
            (await place(first, 49000))["order_id"],
            (await place(other, 2000, instrument=ETH))["order_id"],
            (await place(first, 49000))["order_id"],
        ]
    assert ids == ["BTC-1", "ETH-2", "BTC-3"]
    assert [o["order_id"] for o in sim.orders("id1")] == ["BTC-1", "BTC-3"]
    assert [o["order_id"] for o in sim.orders("id2")] == ["ETH-2"]


@pytest.mark.parametrize(
    ("side", "instrument", "price", "moved_to"),
    [("buy", BTC, 51000, 50004.5), ("sell", BTC, 40000, 49995.5), ("sell", ETH, 1, 2999.55)],
)
async def test_post_only_that_would_trade_is_moved_one_tick_inside_the_book(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
    side: str,
    instrument: str,
    price: float,
    moved_to: float,
) -> None:
    """A crossing post-only order rests at one tick inside the spread instead of trading."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, price, side, instrument=instrument, post_only=True)
    assert (order["order_state"], order["price"]) == ("open", moved_to)
    assert (order["post_only"], order["reject_post_only"]) == (True, False)


async def test_post_only_with_reject_post_only_that_would_trade_is_refused(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """reject_post_only makes a crossing post-only order fail with 11054 and leaves no order."""
    async with connect(sim) as client:
        await client.auth()
        error = await client.error(
            "private/buy", limit(50005, post_only=True, reject_post_only=True)
        )
        resting = await place(client, 50000, post_only=True, reject_post_only=True)
    assert error == {"code": 11054, "message": "post_only_reject"}
    assert (resting["price"], resting["reject_post_only"]) == (50000, True)
    assert [o["order_id"] for o in sim.orders("id1")] == [resting["order_id"]]


async def test_immediate_or_cancel_and_fill_or_kill_never_rest(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """IOC that cannot trade is cancelled, FOK rejected; when they cross they fill at once."""
    async with connect(sim) as client:
        await client.auth()
        ioc = await place(client, 49000, time_in_force="immediate_or_cancel")
        fok = await place(client, 49000, time_in_force="fill_or_kill")
        ioc_filled = await place(client, 50005, time_in_force="immediate_or_cancel")
        fok_filled = await place(client, 49995, "sell", time_in_force="fill_or_kill")
    assert (ioc["order_state"], ioc["cancel_reason"]) == ("cancelled", "user_request")
    assert fok["order_state"] == "rejected"
    assert "cancel_reason" not in fok
    assert ioc_filled["order_state"] == fok_filled["order_state"] == "filled"
    assert sim.open_orders("id1") == []


async def test_good_til_day_rests_like_good_til_cancelled(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A good_til_day order rests open and keeps its time_in_force."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000, time_in_force="good_til_day")
    assert (order["order_state"], order["time_in_force"]) == ("open", "good_til_day")


async def test_contracts_may_stand_in_for_amount(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """contracts times the contract size gives the amount; both given must agree."""
    async with connect(sim) as client:
        await client.auth()
        by_contracts = await client.result(
            "private/buy", {"instrument_name": BTC, "contracts": 3, "price": 49000}
        )
        error = await client.error("private/buy", limit(49000, 10, contracts=2))
    assert by_contracts["order"]["amount"] == 30
    assert error["data"]["param"] == "contracts"


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        pytest.param({"amount": 10, "price": 49000}, -32000, None, id="no-instrument"),
        pytest.param(limit(49000, instrument="BTC-25DEC99"), -32602, "instrument_name", id="inst"),
        pytest.param({"instrument_name": BTC, "price": 49000}, -32000, None, id="no-amount"),
        pytest.param({"instrument_name": BTC, "amount": 10}, -32000, None, id="no-price"),
        pytest.param(limit(49000, 0), -32602, "amount", id="zero-amount"),
        pytest.param({**limit(49000), "amount": "10"}, -32602, "amount", id="string-amount"),
        pytest.param(limit(-1), -32602, "price", id="negative-price"),
        pytest.param(limit(49000, type="market"), -32602, "type", id="market"),
        pytest.param(limit(49000, label="x" * 65), -32602, "label", id="long-label"),
        pytest.param(limit(49000, time_in_force="forever"), -32602, "time_in_force", id="tif"),
        pytest.param(limit(49000, post_only="yes"), -32602, "post_only", id="post-only-str"),
        pytest.param(
            limit(49000, post_only=True, time_in_force="immediate_or_cancel"),
            -32602,
            "post_only",
            id="post-only-ioc",
        ),
    ],
)
async def test_bad_order_params_are_refused_naming_the_param(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
    params: dict[str, Any],
    code: int,
    param: str | None,
) -> None:
    """A missing order param is -32000; a wrong one is -32602 naming it; no order is made."""
    async with connect(sim) as client:
        await client.auth()
        error = await client.error("private/buy", params)
    assert error["code"] == code
    if param is not None:
        assert error["data"]["param"] == param
    assert sim.orders("id1") == []


async def test_a_64_character_label_is_accepted(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A label of exactly 64 characters is within the limit."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000, label="x" * 64)
    assert order["label"] == "x" * 64


@pytest.mark.parametrize("method", PRIVATE_TRADING)
async def test_trading_and_private_subscription_methods_need_auth(
    autojump_clock: trio.testing.MockClock, sim: Simulator, method: str
) -> None:
    """Every private trading or subscription method without auth gets 13009."""
    async with connect(sim) as client:
        error = await client.error(method, {**limit(49000), "order_id": "BTC-1", "channels": []})
    assert error == {"code": 13009, "message": "unauthorized"}


# Changing, cancelling and reading orders ------------------------------------------------------


async def test_edit_changes_amount_and_price_and_keeps_the_id(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """private/edit answers the same order id with the new amount and price, marked replaced."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000)
        await trio.sleep(2)
        result = await client.result(
            "private/edit", {"order_id": order["order_id"], "amount": 40, "price": 49500}
        )
    edited = result["order"]
    assert result["trades"] == []
    assert (edited["order_id"], edited["amount"], edited["price"]) == (order["order_id"], 40, 49500)
    assert (edited["order_state"], edited["replaced"]) == ("open", True)
    assert edited["creation_timestamp"] == order["creation_timestamp"]
    assert edited["last_update_timestamp"] >= order["last_update_timestamp"] + 1999
    assert sim.open_orders("id1") == [edited]


async def test_edit_that_now_crosses_fills(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """An edit to a price through the bid fills the sell at the bid."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 51000, "sell")
        result = await client.result(
            "private/edit", {"order_id": order["order_id"], "amount": 10, "price": 49000}
        )
    assert result["order"]["order_state"] == "filled"
    assert result["trades"][0]["price"] == 49995


async def test_edit_of_post_only_with_reject_that_would_trade_cancels_it(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A reject_post_only order edited to a crossing price ends cancelled, edit_post_only_reject."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000, post_only=True, reject_post_only=True)
        result = await client.result(
            "private/edit", {"order_id": order["order_id"], "amount": 10, "price": 50010}
        )
    edited = result["order"]
    assert (edited["order_state"], edited["cancel_reason"]) == (
        "cancelled",
        "edit_post_only_reject",
    )


@pytest.mark.parametrize("method", ["private/edit", "private/cancel", "private/get_order_state"])
async def test_unknown_or_foreign_order_id_is_order_not_found(
    autojump_clock: trio.testing.MockClock, sim: Simulator, method: str
) -> None:
    """An id no order has, or another account's order, gets 10004."""
    async with connect(sim) as client, connect(sim) as other:
        await client.auth()
        await other.auth("id2", "other-secret")
        foreign = await place(other, 49000)
        params = {"amount": 10, "price": 49000}
        unknown = await client.error(method, {**params, "order_id": "BTC-999"})
        not_mine = await client.error(method, {**params, "order_id": foreign["order_id"]})
    assert unknown == not_mine == {"code": 10004, "message": "order_not_found"}
    assert sim.open_orders("id2")[0]["order_id"] == foreign["order_id"]


@pytest.mark.parametrize("method", ["private/edit", "private/cancel"])
async def test_editing_or_cancelling_a_closed_order_is_not_open_order(
    autojump_clock: trio.testing.MockClock, sim: Simulator, method: str
) -> None:
    """A filled or cancelled order cannot be edited or cancelled: 11044."""
    async with connect(sim) as client:
        await client.auth()
        filled = await place(client, 51000)
        cancelled = await place(client, 49000)
        await client.result("private/cancel", {"order_id": cancelled["order_id"]})
        params = {"amount": 10, "price": 49000}
        errors = [
            await client.error(method, {**params, "order_id": order["order_id"]})
            for order in (filled, cancelled)
        ]
    assert errors == [{"code": 11044, "message": "not_open_order"}] * 2


async def test_cancel_answers_the_cancelled_order(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """private/cancel answers the order object, cancelled at the user's request."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000)
        cancelled = await client.result("private/cancel", {"order_id": order["order_id"]})
        state = await client.result("private/get_order_state", {"order_id": order["order_id"]})
    assert cancelled["order_id"] == order["order_id"]
    assert (cancelled["order_state"], cancelled["cancel_reason"]) == ("cancelled", "user_request")
    assert state == cancelled
    assert sim.open_orders("id1") == []


async def test_cancel_all_counts_or_lists_only_this_accounts_open_orders(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """cancel_all answers the number cancelled, or with detailed the orders; others' stay."""
    async with connect(sim) as client, connect(sim) as other:
        await client.auth()
        await other.auth("id2", "other-secret")
        foreign = await place(other, 49000)
        await place(client, 51000)  # filled: not cancelled
        for _ in range(2):
            await place(client, 49000)
        assert await client.result("private/cancel_all") == 2
        assert await client.result("private/cancel_all") == 0
        third = await place(client, 2000, instrument=ETH)
        detailed = await client.result("private/cancel_all", {"detailed": True})
    assert [(o["order_id"], o["order_state"]) for o in detailed] == [
        (third["order_id"], "cancelled")
    ]
    assert [o["order_id"] for o in sim.open_orders("id2")] == [foreign["order_id"]]


async def test_cancel_all_by_currency_and_by_instrument_select_their_orders(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """by_currency cancels that currency's open orders, by_instrument that instrument's."""
    async with connect(sim) as client:
        await client.auth()
        await place(client, 49000)
        eth = await place(client, 2000, instrument=ETH)
        assert await client.result("private/cancel_all_by_currency", {"currency": "BTC"}) == 1
        assert (
            await client.result(
                "private/cancel_all_by_currency", {"currency": "ETH", "kind": "option"}
            )
            == 0
        )
        assert (
            await client.result(
                "private/cancel_all_by_instrument", {"instrument_name": BTC, "type": "all"}
            )
            == 0
        )
        assert [o["order_id"] for o in sim.open_orders("id1")] == [eth["order_id"]]
        detailed = await client.result(
            "private/cancel_all_by_instrument", {"instrument_name": ETH, "detailed": True}
        )
        error = await client.error("private/cancel_all_by_currency", {"currency": "XYZ"})
    assert [o["order_id"] for o in detailed] == [eth["order_id"]]
    assert error["data"]["param"] == "currency"


async def test_cancel_by_label_cancels_that_labels_open_orders(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """cancel_by_label counts what it cancelled; a label no order ever had gets 10004."""
    async with connect(sim) as client:
        await client.auth()
        await place(client, 49000, label="grid")
        await place(client, 2000, instrument=ETH, label="grid")
        await place(client, 49000, label="other")
        by_currency = await client.result(
            "private/cancel_by_label", {"label": "grid", "currency": "ETH"}
        )
        rest = await client.result("private/cancel_by_label", {"label": "grid"})
        again = await client.result("private/cancel_by_label", {"label": "grid"})
        error = await client.error("private/cancel_by_label", {"label": "never"})
    assert (by_currency, rest, again) == (1, 1, 0)
    assert error == {"code": 10004, "message": "order_not_found"}
    assert [o["label"] for o in sim.open_orders("id1")] == ["other"]


async def test_open_order_readers_list_open_orders_only(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """get_open_orders_by_currency and _by_instrument list this account's open orders."""
    async with connect(sim) as client:
        await client.auth()
        btc = await place(client, 49000)
        await place(client, 51000)  # filled
        eth = await place(client, 2000, instrument=ETH)
        by_btc = await client.result("private/get_open_orders_by_currency", {"currency": "BTC"})
        by_eth = await client.result(
            "private/get_open_orders_by_instrument", {"instrument_name": ETH}
        )
        triggers = await client.result(
            "private/get_open_orders_by_currency", {"currency": "BTC", "type": "stop_all"}
        )
        error = await client.error(
            "private/get_open_orders_by_instrument", {"instrument_name": "nope"}
        )
    assert by_btc == [btc]
    assert by_eth == [eth]
    assert triggers == []
    assert error["data"]["param"] == "instrument_name"


async def test_sim_readers_and_fill(autojump_clock: trio.testing.MockClock, sim: Simulator) -> None:
    """sim.orders filters by connection; sim.fill fills a resting order and notifies."""
    async with connect(sim) as first, connect(sim) as second:
        await first.auth()
        await second.auth()
        mine = await place(first, 49000)
        theirs = await place(second, 49000)
        await subscribe(second, ANY_ORDERS)
        filled = sim.fill(mine["order_id"])
        assert await data_on(second, ANY_ORDERS) == filled
        with pytest.raises(ValueError, match="filled"):
            sim.fill(mine["order_id"])
        state = await first.result("private/get_order_state", {"order_id": mine["order_id"]})
    assert (filled["order_state"], filled["average_price"]) == ("filled", 49000)
    assert filled["filled_amount"] == filled["amount"]
    assert state == filled
    assert sim.orders("id1", conn=sim.connections[1]) == [theirs]
    assert sim.open_orders("id1") == [theirs]
    with pytest.raises(KeyError):
        sim.orders("nobody")
    with pytest.raises(KeyError):
        sim.fill("BTC-404")


async def test_wait_for_wakes_when_an_order_changes(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """wait_for returns once a predicate on the orders becomes true."""
    seen = trio.Event()

    async def watch() -> None:
        await sim.wait_for(lambda: bool(sim.open_orders("id1")))
        seen.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with connect(sim) as client:
            await client.auth()
            await place(client, 49000)
            with trio.fail_after(5):
                await seen.wait()


# Subscriptions --------------------------------------------------------------------------------


async def test_subscribe_answers_the_known_channels_even_if_already_held(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """The result lists every requested channel the simulator knows; others are left out."""
    channels = [BTC_ORDERS, ANY_ORDERS, "user.orders.future.ETH.raw", f"ticker.{ETH}.100ms"]
    unknown = ["user.orders.BTC-25DEC99.raw", f"user.orders.{BTC}.100ms", "book.BTC.none.1.100ms"]
    async with connect(sim) as client:
        await client.auth()
        assert await client.result("public/subscribe", {"channels": channels + unknown}) == channels
        again = await client.result("private/subscribe", {"channels": [BTC_ORDERS, BTC_ORDERS]})
        await client.result("public/unsubscribe_all")
    assert again == [BTC_ORDERS]
    assert sim.connections[0].channels == []


async def test_unsubscribe_answers_only_the_channels_removed(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """unsubscribe lists what it removed; unsubscribe_all answers ok and clears the rest."""
    async with connect(sim) as client:
        await client.auth()
        await subscribe(client, BTC_ORDERS, ANY_ORDERS, "user.portfolio.BTC")
        removed = await client.result(
            "public/unsubscribe", {"channels": [BTC_ORDERS, "user.orders.ETH-PERPETUAL.raw"]}
        )
        again = await client.result("private/unsubscribe", {"channels": [BTC_ORDERS]})
        assert sim.connections[0].channels == [ANY_ORDERS, "user.portfolio.BTC"]
        assert await client.result("private/unsubscribe_all") == "ok"
        client.notifications.clear()  # the portfolio the subscription started with
        await place(client, 49000)
        await assert_quiet(client)
    assert (removed, again) == ([BTC_ORDERS], [])
    assert sim.connections[0].channels == []


@pytest.mark.parametrize(
    ("channels", "code"),
    [
        pytest.param([BTC_ORDERS], 13778, id="raw"),
        pytest.param([f"ticker.{BTC}.100ms", "trades.BTC-PERPETUAL.raw"], 13778, id="public-raw"),
        pytest.param(["user.portfolio.btc"], 13009, id="portfolio"),
    ],
)
async def test_private_channels_on_public_subscribe_need_auth(
    autojump_clock: trio.testing.MockClock, sim: Simulator, channels: list[str], code: int
) -> None:
    """Without auth, any .raw channel gets 13778 and user.portfolio 13009; nothing is held."""
    async with connect(sim) as client:
        error = await client.error("public/subscribe", {"channels": channels})
    assert error["code"] == code
    assert sim.connections[0].channels == []


async def test_public_channels_need_no_auth(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A ticker channel may be subscribed to and dropped without auth."""
    ticker = f"ticker.{BTC}.100ms"
    async with connect(sim) as client:
        assert await client.result("public/subscribe", {"channels": [ticker]}) == [ticker]
        assert await client.result("public/unsubscribe", {"channels": [ticker]}) == [ticker]


@pytest.mark.parametrize(
    ("params", "code"),
    [({}, -32000), ({"channels": BTC_ORDERS}, -32602), ({"channels": [BTC_ORDERS, 5]}, -32602)],
)
async def test_channels_must_be_a_list_of_strings(
    autojump_clock: trio.testing.MockClock, sim: Simulator, params: dict[str, Any], code: int
) -> None:
    """A missing channels param is -32000; one that is not a list of strings is -32602."""
    async with connect(sim) as client:
        await client.auth()
        error = await client.error("private/subscribe", params)
    assert error["code"] == code
    if code == -32602:
        assert error["data"]["param"] == "channels"


async def test_order_changes_reach_every_subscribed_connection_of_the_account(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """Each change is sent on each matching channel of the account's connections, no others."""
    async with connect(sim) as placer, connect(sim) as watcher, connect(sim) as stranger:
        await placer.auth()
        await watcher.auth()
        await stranger.auth("id2", "other-secret")
        await subscribe(placer, BTC_ORDERS)
        await subscribe(watcher, BTC_ORDERS, ANY_ORDERS)
        await subscribe(stranger, ANY_ORDERS)
        order = await place(placer, 49000)
        assert await data_on(placer, BTC_ORDERS) == order
        frame = await notification(watcher, BTC_ORDERS)
        assert frame == {
            "jsonrpc": "2.0",
            "method": "subscription",
            "params": {"channel": BTC_ORDERS, "data": order},
        }
        assert await data_on(watcher, ANY_ORDERS) == order
        edited = await placer.result(
            "private/edit", {"order_id": order["order_id"], "amount": 20, "price": 49500}
        )
        assert await data_on(watcher, BTC_ORDERS) == edited["order"]
        cancelled = await placer.result("private/cancel", {"order_id": order["order_id"]})
        assert await data_on(watcher, BTC_ORDERS) == cancelled
        eth = await place(placer, 2000, instrument=ETH)
        assert await data_on(watcher, ANY_ORDERS) == edited["order"]
        assert await data_on(watcher, ANY_ORDERS) == cancelled
        assert await data_on(watcher, ANY_ORDERS) == eth
        await assert_quiet(watcher)
        await assert_quiet(stranger)


async def test_portfolio_comes_at_subscribe_and_after_order_changes_in_its_currency(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """user.portfolio sends the portfolio at once and after each change in that currency."""
    async with connect(sim) as client:
        await client.auth()
        assert await client.result("public/subscribe", {"channels": ["user.portfolio.btc"]}) == [
            "user.portfolio.btc"
        ]
        first = await data_on(client, "user.portfolio.btc")
        await place(client, 2000, instrument=ETH)
        await assert_quiet(client)
        await place(client, 49000)
        after = await data_on(client, "user.portfolio.btc")
    assert first["currency"] == "BTC"
    assert {"balance", "equity", "available_funds", "margin_balance", "initial_margin"} <= set(
        first
    )
    assert after == first


async def test_ticker_ticks_every_100ms_at_a_steady_pace(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """ticker.{instrument}.100ms sends N tickers in N times 100 ms, until unsubscribed."""
    channel = f"ticker.{BTC}.100ms"
    async with connect(sim) as client:
        await client.result("public/subscribe", {"channels": [channel]})
        started = trio.current_time()
        arrivals, tickers = [], []
        for _ in range(10):
            tickers.append(await data_on(client, channel))
            arrivals.append(trio.current_time() - started)
        await client.result("public/unsubscribe", {"channels": [channel]})
        client.notifications.clear()
        await assert_quiet(client, 5)
    assert arrivals == pytest.approx([0.1 * n for n in range(1, 11)])
    steps = [b["timestamp"] - a["timestamp"] for a, b in itertools.pairwise(tickers)]
    assert all(99 <= step <= 101 for step in steps)
    ticker = tickers[0]
    assert (ticker["instrument_name"], ticker["state"]) == (BTC, "open")
    assert (ticker["best_bid_price"], ticker["best_ask_price"]) == (49995, 50005)
    assert ticker["mark_price"] == ticker["index_price"] == 50000
    assert {"best_bid_amount", "best_ask_amount", "last_price", "open_interest", "stats"} <= set(
        ticker
    )
    assert {"funding_8h", "current_funding", "min_price", "max_price"} <= set(ticker)


# Cancel On Disconnect -------------------------------------------------------------------------


async def test_cod_cancels_only_that_connections_open_orders_and_notifies(
    autojump_clock: trio.testing.MockClock,
    sim: Simulator,
) -> None:
    """When a COD connection closes, its open orders are cancelled; subscribers hear of it."""
    async with connect(sim) as watcher:
        await watcher.auth()
        await subscribe(watcher, ANY_ORDERS)
        kept = await place(watcher, 48000)
        async with connect(sim) as doomed:
            await doomed.auth()
            await enable_cod(doomed)
            first = await place(doomed, 49000)
            await place(doomed, 51000)  # filled: COD leaves it alone
            second = await place(doomed, 2000, instrument=ETH)
            for _ in range(4):
                await notification(watcher, ANY_ORDERS)
        conn = sim.connections[1]
        await sim.wait_for(lambda: not conn.open)
        assert conn.cod_fired
        assert conn.cod_cancelled == [first["order_id"], second["order_id"]]
        cancels = [await data_on(watcher, ANY_ORDERS) for _ in range(2)]
        await assert_quiet(watcher)
    assert [(o["order_id"], o["order_state"], o["cancel_reason"]) for o in cancels] == [
        (first["order_id"], "cancelled", "cancel_on_disconnect"),
        (second["order_id"], "cancelled", "cancel_on_disconnect"),
    ]
    assert [o["order_id"] for o in sim.open_orders("id1")] == [kept["order_id"]]
    assert [o["order_state"] for o in sim.orders("id1", conn=conn)] == [
        "cancelled",
        "filled",
        "cancelled",
    ]


async def test_cod_fires_when_a_test_request_goes_unanswered(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """A missed heartbeat closes the connection and cancels its orders."""
    async with connect(sim) as client:
        await client.auth()
        await enable_cod(client)
        order = await place(client, 49000)
        await client.result("public/set_heartbeat", {"interval": 10})
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv()
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert conn.cod_cancelled == [order["order_id"]]
    assert sim.orders("id1")[0]["cancel_reason"] == "cancel_on_disconnect"


@pytest.mark.parametrize("abrupt", [False, True])
async def test_cod_fires_when_the_server_drops_the_connection(
    autojump_clock: trio.testing.MockClock, sim: Simulator, abrupt: bool
) -> None:
    """A server-side close, clean or abrupt, cancels the connection's open orders."""
    async with connect(sim) as client:
        await client.auth()
        await enable_cod(client)
        await place(client, 49000)
        await sim.drop(sim.connections[0], abrupt=abrupt)
    assert sim.open_orders("id1") == []
    assert len(sim.connections[0].cod_cancelled) == 1


async def test_logout_keeps_the_orders(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """private/logout ends a COD connection without cancelling its orders."""
    async with connect(sim) as client:
        await client.auth()
        await enable_cod(client)
        order = await place(client, 49000)
        await client.send("private/logout")
        with pytest.raises(ConnectionClosed):
            await client.recv()
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert (conn.cod_fired, conn.cod_cancelled) == (False, [])
    assert sim.open_orders("id1") == [order]


async def test_a_connection_without_cod_leaves_its_orders_open(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """Closing a connection whose COD is off cancels nothing."""
    async with connect(sim) as client:
        await client.auth()
        order = await place(client, 49000)
    await sim.wait_for(lambda: not sim.connections[0].open)
    assert sim.open_orders("id1") == [order]


async def test_account_scope_cod_protects_the_orders_of_later_connections(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """With scope account, a connection authenticating later starts with COD and is protected."""
    async with connect(sim) as setter:
        await setter.auth()
        await setter.result("private/enable_cancel_on_disconnect", {"scope": "account"})
        unprotected = await place(setter, 48000)
        async with connect(sim) as later:
            await later.auth()
            assert await later.result("private/get_cancel_on_disconnect") == {
                "scope": "connection",
                "enabled": True,
            }
            protected = await place(later, 49000)
        await sim.wait_for(lambda: not sim.connections[1].open)
        assert sim.connections[1].cod_cancelled == [protected["order_id"]]
    await sim.wait_for(lambda: not sim.connections[0].open)
    assert sim.connections[0].cod_cancelled == []
    assert sim.open_orders("id1") == [unprotected]


async def test_get_open_orders_lists_every_currency_and_get_positions_nets_the_fills(
    autojump_clock: trio.testing.MockClock, sim: Simulator
) -> None:
    """What NautilusTrader's reconciliation asks for: every open order of the account, and the
    net position per instrument from its fills (none until something fills)."""
    async with connect(sim) as client:
        await client.auth()
        assert await client.result("private/get_positions", {"currency": "any"}) == []
        resting = [
            await place(client, 40000),
            await place(client, 1000, instrument="ETH-PERPETUAL"),
        ]
        listed = await client.result("private/get_open_orders")
        assert [o["order_id"] for o in listed] == [o["order_id"] for o in resting]
        await place(client, 51000, amount=30)  # fills 30 at the ask, 50005
        await place(client, 49000, side="sell", amount=10)  # fills 10 at the bid
        [position] = await client.result("private/get_positions", {"currency": "BTC"})
        assert await client.result("private/get_positions", {"currency": "ETH"}) == []
    assert (position["instrument_name"], position["direction"], position["size"]) == (
        BTC,
        "buy",
        20,
    )
    assert position["kind"] == "future" and position["mark_price"] > 0
