"""The simulator's trading and market-data methods: reading params, acting on the order book.

Every private method here acts on the account the request is authenticated as (13009 without
auth, as for every private method); an account sees and touches only its own orders. Params are
read with the strict readers of ``jsonrpc``: absent is -32000, present but wrong is -32602
naming the param. **(choice)** Only limit orders are simulated: another ``type`` is -32602
``type``; an ``instrument_name`` the simulator does not list is -32602 ``instrument_name``;
``amount`` and ``price`` must be positive (no contract-size or tick check); ``post_only`` with
``immediate_or_cancel`` or ``fill_or_kill`` is -32602 ``post_only`` (Deribit allows it only on
resting orders). With ``detailed: true`` the cancel-many methods answer the list of cancelled
order objects instead of their count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from deribit_keeper.jsonrpc import (
    RpcFault,
    get_choice,
    get_number,
    get_str,
    invalid,
    opt_bool,
    opt_str,
)
from deribit_keeper.protocol import ErrorCode

from .market import (
    CURRENCIES,
    INSTRUMENTS,
    Instrument,
    account_summary_object,
    currency_object,
    instrument_object,
)
from .market import instruments_of as market_instruments
from .orders import TIME_IN_FORCE, Direction, Order, OrderBook, OrderEvent, Outcome
from .records import Call, Reply

MAX_LABEL_CHARS: Final = 64  # the sheet: label at most 64 characters
INSTRUMENT_KINDS: Final = ("future", "option", "spot", "future_combo", "option_combo")
# Order types a filter may name; the simulator's orders are all "limit", which "all" includes.
ORDER_TYPE_FILTERS: Final = (
    "all",
    "limit",
    "trigger_all",
    "stop_all",
    "stop_limit",
    "stop_market",
    "take_all",
    "take_limit",
    "take_market",
    "trailing_all",
    "trailing_stop",
)


class TradingMethods:
    """Orders, market data and the account's (constant) balances over JSON-RPC.

    Args:
        book: the simulator-wide order book.
        client: the account a private request acts for (13009 without valid auth).
    """

    def __init__(self, book: OrderBook, client: Callable[[Call], str]) -> None:
        self._book = book
        self._client = client

    def methods(self) -> dict[str, Callable[[Call], Reply]]:
        """The JSON-RPC methods served here, by name."""
        return {
            "public/get_instruments": self._get_instruments,
            "public/get_currencies": self._get_currencies,
            "public/get_time": self._get_time,
            "private/get_account_summary": self._get_account_summary,
            "private/get_account_summaries": self._get_account_summaries,
            "private/buy": self._buy,
            "private/sell": self._sell,
            "private/edit": self._edit,
            "private/cancel": self._cancel,
            "private/cancel_all": self._cancel_all,
            "private/cancel_all_by_currency": self._cancel_all_by_currency,
            "private/cancel_all_by_instrument": self._cancel_all_by_instrument,
            "private/cancel_by_label": self._cancel_by_label,
            "private/get_order_state": self._get_order_state,
            "private/get_open_orders_by_currency": self._open_by_currency,
            "private/get_open_orders_by_instrument": self._open_by_instrument,
            "private/get_open_orders": self._open_orders,
            "private/get_positions": self._get_positions,
        }

    # Market data ------------------------------------------------------------------------------

    @staticmethod
    def _get_instruments(call: Call) -> Reply:
        """(choice) ``currency`` may be left out for ``any``: Deribit's docs call it required,
        yet ccxt's ``load_markets`` asks without it and gets every instrument."""
        currency = get_choice(call.params, "currency", (*CURRENCIES, "any"), "any")
        kind = opt_str(call.params, "kind", "future")
        if kind not in INSTRUMENT_KINDS:
            raise invalid("kind", "invalid value")
        if kind != "future" or opt_bool(call.params, "expired", False):
            return Reply([])  # perpetuals never expire, and they are all there is
        return Reply([instrument_object(i) for i in market_instruments(currency)])

    @staticmethod
    def _get_currencies(call: Call) -> Reply:
        return Reply([currency_object(i) for i in INSTRUMENTS.values()])

    @staticmethod
    def _get_time(call: Call) -> Reply:
        """The server's clock in ms, as ccxt's ``fetch_time`` reads it."""
        return Reply(int(call.wall_now * 1000))

    # The account ------------------------------------------------------------------------------

    def _get_account_summary(self, call: Call) -> Reply:
        """The constant, healthy account of ``market.account_summary_object``, per currency."""
        self._client(call)
        currency = get_choice(call.params, "currency", CURRENCIES)
        opt_bool(call.params, "extended", False)  # the extended fields are not simulated
        return Reply(account_summary_object(currency))

    def _get_account_summaries(self, call: Call) -> Reply:
        """Every settlement currency's summary; what ccxt's ``fetch_balance`` asks for."""
        self._client(call)
        opt_bool(call.params, "extended", False)
        currencies = dict.fromkeys(i.currency for i in INSTRUMENTS.values())
        return Reply({"summaries": [account_summary_object(c) for c in currencies]})

    # Placing and changing orders --------------------------------------------------------------

    def _buy(self, call: Call) -> Reply:
        return self._place(call, "buy")

    def _sell(self, call: Call) -> Reply:
        return self._place(call, "sell")

    def _place(self, call: Call, direction: Direction) -> Reply:
        client_id = self._client(call)
        params = call.params
        instrument = _instrument(params)
        get_choice(params, "type", ("limit",), "limit")
        amount = _amount(params, instrument)
        price = _positive(params, "price")
        label = opt_str(params, "label", "")
        if len(label) > MAX_LABEL_CHARS:
            raise invalid("label", f"at most {MAX_LABEL_CHARS} characters")
        time_in_force = get_choice(params, "time_in_force", TIME_IN_FORCE, "good_til_cancelled")
        post_only = opt_bool(params, "post_only", False)
        if post_only and time_in_force in ("fill_or_kill", "immediate_or_cancel"):
            raise invalid("post_only", "only valid with a resting time_in_force")
        outcome = self._book.place(
            client_id=client_id,
            conn_id=None if call.conn is None else call.conn.id,  # HTTP: no connection
            instrument=instrument,
            direction=direction,
            amount=amount,
            price=price,
            label=label,
            time_in_force=time_in_force,
            post_only=post_only,
            reject_post_only=opt_bool(params, "reject_post_only", False),
            reduce_only=opt_bool(params, "reduce_only", False),
            wall_now=call.wall_now,
        )
        return _trade_reply(outcome)

    def _edit(self, call: Call) -> Reply:
        client_id = self._client(call)
        params = call.params
        order_id = get_str(params, "order_id")
        order = self._book.get(client_id, order_id)
        outcome = self._book.edit(
            client_id,
            order_id,
            amount=_amount(params, order.instrument),
            price=_positive(params, "price"),
            post_only=opt_bool(params, "post_only", False) if "post_only" in params else None,
            reject_post_only=(
                opt_bool(params, "reject_post_only", False)
                if "reject_post_only" in params
                else None
            ),
            wall_now=call.wall_now,
        )
        return _trade_reply(outcome)

    # Cancelling -------------------------------------------------------------------------------

    def _cancel(self, call: Call) -> Reply:
        client_id = self._client(call)
        outcome = self._book.cancel(
            client_id, get_str(call.params, "order_id"), wall_now=call.wall_now
        )
        return Reply(outcome.order, events=outcome.events)

    def _cancel_all(self, call: Call) -> Reply:
        client_id = self._client(call)
        return self._cancel_many(call, lambda o: o.client_id == client_id)

    def _cancel_all_by_currency(self, call: Call) -> Reply:
        client_id = self._client(call)
        currency = get_choice(call.params, "currency", CURRENCIES)
        kind = get_choice(call.params, "kind", (*INSTRUMENT_KINDS, "combo", "any"), "any")
        types = _type_filter(call.params)
        return self._cancel_many(
            call,
            lambda o: (
                o.client_id == client_id
                and o.instrument.currency == currency
                and kind in ("future", "any")
                and types
            ),
        )

    def _cancel_all_by_instrument(self, call: Call) -> Reply:
        client_id = self._client(call)
        instrument = _instrument(call.params)
        types = _type_filter(call.params)
        return self._cancel_many(
            call, lambda o: o.client_id == client_id and o.instrument is instrument and types
        )

    def _cancel_by_label(self, call: Call) -> Reply:
        """**(choice)** 10004 only when no order of the account (in ``currency``, if given),
        in any state, has the label; a label whose orders are all closed cancels 0."""
        client_id = self._client(call)
        label = get_str(call.params, "label")
        currency = (
            get_choice(call.params, "currency", CURRENCIES) if "currency" in call.params else None
        )

        def selected(o: Order) -> bool:
            return (
                o.client_id == client_id
                and o.label == label
                and currency in (None, o.instrument.currency)
            )

        if not self._book.orders(selected):
            raise RpcFault(ErrorCode.ORDER_NOT_FOUND)
        return self._cancel_many(call, selected)

    def _cancel_many(self, call: Call, predicate: Callable[[Order], bool]) -> Reply:
        detailed = opt_bool(call.params, "detailed", False)
        events = self._book.cancel_where(predicate, wall_now=call.wall_now)
        result: Any = [event.order for event in events] if detailed else len(events)
        return Reply(result, events=tuple(events))

    # Reading ----------------------------------------------------------------------------------

    def _get_order_state(self, call: Call) -> Reply:
        client_id = self._client(call)
        return Reply(self._book.get(client_id, get_str(call.params, "order_id")).wire())

    def _open_by_currency(self, call: Call) -> Reply:
        client_id = self._client(call)
        currency = get_choice(call.params, "currency", CURRENCIES)
        kind = get_choice(call.params, "kind", (*INSTRUMENT_KINDS, "combo", "any"), "any")
        types = _type_filter(call.params)
        orders = self._book.orders(
            lambda o: (
                o.is_open
                and o.client_id == client_id
                and o.instrument.currency == currency
                and kind in ("future", "any")
                and types
            )
        )
        return Reply([order.wire() for order in orders])

    def _open_by_instrument(self, call: Call) -> Reply:
        client_id = self._client(call)
        instrument = _instrument(call.params)
        types = _type_filter(call.params)
        orders = self._book.orders(
            lambda o: (
                o.is_open and o.client_id == client_id and o.instrument is instrument and types
            )
        )
        return Reply([order.wire() for order in orders])

    def _open_orders(self, call: Call) -> Reply:
        """Every open order of the account, whatever its currency (NautilusTrader's
        reconciliation asks for this one)."""
        client_id = self._client(call)
        kind = get_choice(call.params, "kind", (*INSTRUMENT_KINDS, "combo", "any"), "any")
        types = _type_filter(call.params)
        orders = self._book.orders(
            lambda o: o.is_open and o.client_id == client_id and kind in ("future", "any") and types
        )
        return Reply([order.wire() for order in orders])

    def _get_positions(self, call: Call) -> Reply:
        """(choice) The net position per instrument from the account's fills (no funding, no
        margin): only instruments with a position are listed."""
        client_id = self._client(call)
        currency = get_choice(call.params, "currency", (*CURRENCIES, "any"), "any")
        kind = get_choice(call.params, "kind", (*INSTRUMENT_KINDS, "combo", "any"), "any")
        if kind not in ("future", "any"):
            return Reply([])
        sizes: dict[str, tuple[float, float]] = {}
        for order in self._book.orders(lambda o: o.client_id == client_id and o.filled_amount > 0):
            if currency not in ("any", order.instrument.currency):
                continue
            sign = 1 if order.direction == "buy" else -1
            size, cost = sizes.get(order.instrument.name, (0.0, 0.0))
            filled = sign * order.filled_amount
            sizes[order.instrument.name] = (size + filled, cost + filled * order.average_price)
        return Reply(
            [
                _position_object(INSTRUMENTS[name], size, cost)
                for name, (size, cost) in sorted(sizes.items())
                if size
            ]
        )


def _position_object(instrument: Instrument, size: float, cost: float) -> dict[str, Any]:
    """Deribit's position object for a net ``size`` (USD, negative short) bought for ``cost``
    (the sum of amount times price): the fields NautilusTrader and ccxt read."""
    mark = instrument.mark_price
    average = abs(cost / size) if size else 0.0
    pnl = size / average - size / mark if size else 0.0  # inverse: in the base currency
    return {
        "instrument_name": instrument.name,
        "kind": "future",
        "direction": "buy" if size > 0 else "sell",
        "size": size,
        "size_currency": size / mark,
        "average_price": average,
        "mark_price": mark,
        "index_price": mark,
        "settlement_price": mark,
        "floating_profit_loss": pnl,
        "total_profit_loss": pnl,
        "realized_profit_loss": 0.0,
        "realized_funding": 0.0,
        "interest_value": 0.0,
        "delta": size / mark,
        "initial_margin": 0.0,
        "maintenance_margin": 0.0,
        "open_orders_margin": 0.0,
        "estimated_liquidation_price": None,
        "leverage": instrument.max_leverage,
    }


def _trade_reply(outcome: Outcome) -> Reply:
    """Deribit's ``{order, trades}`` answer, with the change to publish."""
    events: tuple[OrderEvent, ...] = outcome.events
    return Reply({"order": outcome.order, "trades": outcome.trades}, events=events)


def _instrument(params: dict[str, Any]) -> Instrument:
    """The required ``instrument_name``, one the simulator lists (-32602 otherwise)."""
    instrument = INSTRUMENTS.get(get_str(params, "instrument_name"))
    if instrument is None:
        raise invalid("instrument_name", "instrument not found")
    return instrument


def _positive(params: dict[str, Any], name: str) -> float:
    value = get_number(params, name)
    if not value > 0:
        raise invalid(name, "must be positive")
    return value


def _amount(params: dict[str, Any], instrument: Instrument) -> float:
    """``amount``, or ``contracts`` times the contract size; both given must agree."""
    if "amount" not in params and "contracts" in params:
        return _positive(params, "contracts") * instrument.contract_size
    amount = _positive(params, "amount")
    contracts = _positive(params, "contracts") if "contracts" in params else None
    if contracts is not None and contracts * instrument.contract_size != amount:
        raise invalid("contracts", "does not match amount")
    return amount


def _type_filter(params: dict[str, Any]) -> bool:
    """Whether the optional order ``type`` filter lets limit orders through."""
    return get_choice(params, "type", ORDER_TYPE_FILTERS, "all") in ("all", "limit")
