"""The simulator's orders: limit orders per account, matched against a book that never moves.

An order is placed by an account over a connection and remembers both: the account owns it (no
other account can see or touch it) and the connection is what Cancel On Disconnect looks at. An
order placed over HTTP has no connection (``conn_id`` None), so no COD ever cancels it, as on
Deribit. It trades at once, in full, when it crosses the instrument's fixed best bid or ask,
and otherwise rests until cancelled; nothing else ever trades against it (see ``market``). What
happens to an order that crosses depends on its flags:

- ``post_only`` (only with a resting time in force): never trades. With ``reject_post_only`` the
  request is refused with 11054 ``post_only_reject``; otherwise **(choice)** its price moves
  "just below the spread" as Deribit's docs put it: one tick inside the book, ``best_ask - tick``
  for a buy and ``best_bid + tick`` for a sell.
- ``immediate_or_cancel`` that does not cross: **(choice)** ``order_state: cancelled`` with
  ``cancel_reason: user_request`` (the order's own instruction cancelled it; Deribit's list of
  reasons has none closer).
- ``fill_or_kill`` that does not cross: **(choice)** ``order_state: rejected``, no cancel_reason.
- ``good_til_day`` rests like ``good_til_cancelled``; the simulator's day never ends.

``reduce_only`` is stored and echoed but not enforced: there are no positions. Pure state, no
I/O; every change is told ``wall_now`` (epoch seconds) for the order's timestamps, and returns
``OrderEvent`` snapshots for the caller to publish.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

from deribit_keeper.jsonrpc import RpcFault
from deribit_keeper.protocol import ErrorCode

from .market import Instrument

TIME_IN_FORCE: Final = ("good_til_cancelled", "good_til_day", "fill_or_kill", "immediate_or_cancel")
RESTING: Final = ("good_til_cancelled", "good_til_day")

Direction = Literal["buy", "sell"]


@dataclass(slots=True)
class Order:
    """One order as the book holds it; ``wire()`` is how Deribit shows it."""

    order_id: str
    client_id: str
    conn_id: int | None  # None: placed over HTTP, so no connection's COD ever cancels it
    instrument: Instrument
    direction: Direction
    price: float
    amount: float
    label: str
    time_in_force: str
    post_only: bool
    reject_post_only: bool
    reduce_only: bool
    created_ms: int
    updated_ms: int
    state: str = "open"
    filled_amount: float = 0.0
    average_price: float = 0.0
    cancel_reason: str | None = None
    replaced: bool = False

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    def wire(self) -> dict[str, Any]:
        """The order object of answers and ``user.orders`` notifications (a fresh dict)."""
        order: dict[str, Any] = {
            "order_id": self.order_id,
            "order_state": self.state,
            "order_type": "limit",
            "instrument_name": self.instrument.name,
            "direction": self.direction,
            "price": self.price,
            "amount": self.amount,
            "contracts": self.amount / self.instrument.contract_size,
            "filled_amount": self.filled_amount,
            "average_price": self.average_price,
            "label": self.label,
            "time_in_force": self.time_in_force,
            "post_only": self.post_only,
            "reduce_only": self.reduce_only,
            "api": True,
            "web": False,
            "max_show": self.amount,
            "replaced": self.replaced,
            "mmp": False,
            "risk_reducing": False,
            "is_liquidation": False,
            "creation_timestamp": self.created_ms,
            "last_update_timestamp": self.updated_ms,
        }
        if self.post_only:  # Deribit shows the flag only on post-only orders
            order["reject_post_only"] = self.reject_post_only
        if self.cancel_reason is not None:
            order["cancel_reason"] = self.cancel_reason
        return order


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """A change of one order, as subscribers of its account must hear of it.

    ``order`` is a snapshot taken at the change: later changes do not alter it.
    """

    client_id: str
    conn_id: int | None
    instrument_name: str
    currency: str
    order: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a place or an edit did: the order as it now is, its trades, the event to publish."""

    order: dict[str, Any]
    trades: list[dict[str, Any]]
    events: tuple[OrderEvent, ...]


class OrderBook:
    """Every account's orders, simulator-wide.

    Order ids look like Deribit's, ``BTC-1`` or ``ETH-2``: the settlement currency and one
    counter shared by all accounts, so an id never names two orders.
    """

    def __init__(self) -> None:
        self._orders: dict[str, Order] = {}  # insertion order is creation order
        self._order_seq = itertools.count(1)
        self._trade_seq = itertools.count(1)

    def __repr__(self) -> str:
        open_count = sum(order.is_open for order in self._orders.values())
        return f"OrderBook(orders={len(self._orders)}, open={open_count})"

    def place(
        self,
        *,
        client_id: str,
        conn_id: int | None,
        instrument: Instrument,
        direction: Direction,
        amount: float,
        price: float,
        label: str = "",
        time_in_force: str = "good_til_cancelled",
        post_only: bool = False,
        reject_post_only: bool = False,
        reduce_only: bool = False,
        wall_now: float,
    ) -> Outcome:
        """Place a limit order; it trades at once, rests, or ends at once (see the module).

        Raises:
            RpcFault: 11054 when a post-only order with ``reject_post_only`` would trade.
        """
        if post_only and reject_post_only and _crosses(instrument, direction, price):
            raise RpcFault(ErrorCode.POST_ONLY_REJECT)
        now_ms = int(wall_now * 1000)
        order = Order(
            order_id=f"{instrument.currency}-{next(self._order_seq)}",
            client_id=client_id,
            conn_id=conn_id,
            instrument=instrument,
            direction=direction,
            price=price,
            amount=amount,
            label=label,
            time_in_force=time_in_force,
            post_only=post_only,
            reject_post_only=reject_post_only,
            reduce_only=reduce_only,
            created_ms=now_ms,
            updated_ms=now_ms,
        )
        self._orders[order.order_id] = order
        trades = self._match(order, now_ms)
        if not trades and order.time_in_force == "immediate_or_cancel":
            order.state, order.cancel_reason = "cancelled", "user_request"
        elif not trades and order.time_in_force == "fill_or_kill":
            order.state = "rejected"
        return self._outcome(order, trades)

    def edit(
        self,
        client_id: str,
        order_id: str,
        *,
        amount: float,
        price: float,
        post_only: bool | None = None,
        reject_post_only: bool | None = None,
        wall_now: float,
    ) -> Outcome:
        """Change an open order's amount and price, keeping its id; it may trade now.

        ``post_only``/``reject_post_only`` None keep the order's flags. **(choice)** A post-only
        order with ``reject_post_only`` whose new price would trade is cancelled with
        ``cancel_reason: edit_post_only_reject`` (Deribit's reason for exactly this) and the
        answer shows it cancelled, rather than an error.

        Raises:
            RpcFault: 10004 for an id this account has no order with, 11044 when the order is
                no longer open.
        """
        order = self._open_order(client_id, order_id)
        now_ms = int(wall_now * 1000)
        order.amount, order.price = amount, price
        order.post_only = order.post_only if post_only is None else post_only
        if reject_post_only is not None:
            order.reject_post_only = reject_post_only
        order.replaced, order.updated_ms = True, now_ms
        crosses = _crosses(order.instrument, order.direction, price)
        if order.post_only and order.reject_post_only and crosses:
            order.state, order.cancel_reason = "cancelled", "edit_post_only_reject"
            return self._outcome(order, [])
        return self._outcome(order, self._match(order, now_ms))

    def cancel(self, client_id: str, order_id: str, *, wall_now: float) -> Outcome:
        """Cancel one open order at the user's request.

        Raises:
            RpcFault: 10004 for an id this account has no order with, 11044 when the order is
                no longer open.
        """
        order = self._open_order(client_id, order_id)
        self._cancel(order, "user_request", int(wall_now * 1000))
        return self._outcome(order, [])

    def cancel_where(
        self,
        predicate: Callable[[Order], bool],
        *,
        reason: str = "user_request",
        wall_now: float,
    ) -> list[OrderEvent]:
        """Cancel every open order ``predicate`` selects, in creation order; one event each."""
        now_ms = int(wall_now * 1000)
        events: list[OrderEvent] = []
        for order in self._orders.values():
            if order.is_open and predicate(order):
                self._cancel(order, reason, now_ms)
                events.append(_event(order))
        return events

    def fill(self, order_id: str, *, wall_now: float) -> Outcome:
        """Let a counterparty fill an open order in full at its price (a test's doing).

        Raises:
            KeyError: no order has this id.
            ValueError: the order is no longer open.
        """
        order = self._orders[order_id]
        if not order.is_open:
            raise ValueError(f"order {order_id} is {order.state}, not open")
        trade = self._trade(order, order.price, int(wall_now * 1000), liquidity="M")
        return self._outcome(order, [trade])

    def get(self, client_id: str, order_id: str) -> Order:
        """The account's order with this id, in any state.

        Raises:
            RpcFault: 10004 when this account has no order with that id.
        """
        order = self._orders.get(order_id)
        if order is None or order.client_id != client_id:
            raise RpcFault(ErrorCode.ORDER_NOT_FOUND)
        return order

    def orders(self, predicate: Callable[[Order], bool] = lambda _: True) -> list[Order]:
        """The orders ``predicate`` selects, in creation order (the Order objects themselves)."""
        return [order for order in self._orders.values() if predicate(order)]

    def _open_order(self, client_id: str, order_id: str) -> Order:
        order = self.get(client_id, order_id)
        if not order.is_open:
            raise RpcFault(ErrorCode.NOT_OPEN_ORDER)
        return order

    def _match(self, order: Order, now_ms: int) -> list[dict[str, Any]]:
        """Trade the whole order at the best opposite price if it crosses and may take."""
        instrument, direction = order.instrument, order.direction
        if not _crosses(instrument, direction, order.price):
            return []
        if order.post_only:
            tick = instrument.tick_size
            buying = direction == "buy"
            inside = instrument.best_ask - tick if buying else instrument.best_bid + tick
            order.price = round(inside, 8)  # 2999.5 + 0.05 must not show as 2999.5500000000002
            return []
        fill_price = instrument.best_ask if direction == "buy" else instrument.best_bid
        return [self._trade(order, fill_price, now_ms, liquidity="T")]

    def _trade(
        self, order: Order, price: float, now_ms: int, *, liquidity: Literal["M", "T"]
    ) -> dict[str, Any]:
        order.state = "filled"
        order.filled_amount, order.average_price = order.amount, price
        order.updated_ms = now_ms
        seq = next(self._trade_seq)
        instrument = order.instrument
        return {
            "trade_id": f"{instrument.currency}-{seq}",
            "trade_seq": seq,
            "order_id": order.order_id,
            "instrument_name": instrument.name,
            "direction": order.direction,
            "price": price,
            "amount": order.amount,
            "timestamp": now_ms,
            "state": "filled",
            "order_type": "limit",
            "liquidity": liquidity,
            "fee": 0.0,
            "fee_currency": instrument.currency,
            "mark_price": instrument.mark_price,
            "index_price": instrument.mark_price,
            "tick_direction": 0,
            "label": order.label,
            "post_only": order.post_only,
            "reduce_only": order.reduce_only,
            "api": True,
        }

    @staticmethod
    def _cancel(order: Order, reason: str, now_ms: int) -> None:
        order.state, order.cancel_reason, order.updated_ms = "cancelled", reason, now_ms

    @staticmethod
    def _outcome(order: Order, trades: Iterable[dict[str, Any]]) -> Outcome:
        event = _event(order)
        return Outcome(order=event.order, trades=list(trades), events=(event,))


def _crosses(instrument: Instrument, direction: Direction, price: float) -> bool:
    """Whether a limit order at ``price`` would take liquidity from the fixed book."""
    if direction == "buy":
        return price >= instrument.best_ask
    return price <= instrument.best_bid


def _event(order: Order) -> OrderEvent:
    return OrderEvent(
        client_id=order.client_id,
        conn_id=order.conn_id,
        instrument_name=order.instrument.name,
        currency=order.instrument.currency,
        order=order.wire(),
    )
