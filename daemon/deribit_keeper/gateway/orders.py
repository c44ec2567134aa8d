"""Which open orders each local owner created: what local COD cancels when the owner goes.

Deribit's COD knows which connection created an order. Through the gateway every order is
created on the keeper's one upstream connection, so Deribit cannot tell the engine's links
apart; the gateway keeps that record itself, for each local link and, for orders placed over
HTTP, for each local client. It learns an order's id from the answers it relays
(``private/buy``, ``private/sell``, ``private/edit``) and forgets the order once an answer or a
``user.orders`` notification shows it is no longer open (filled, cancelled, rejected).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

CREATING_METHODS: Final = frozenset({"private/buy", "private/sell"})
PLACING_METHODS: Final = CREATING_METHODS | {"private/edit"}  # answers local COD waits for
OPEN_STATES: Final = frozenset({"open", "untriggered"})


def orders_in(result: Any) -> Iterable[dict[str, Any]]:
    """The order objects in an answer's result or a notification's data, whatever its shape:
    ``{order, trades}``, one order, or a list of orders."""
    if isinstance(result, dict):
        order = result.get("order")
        if isinstance(order, dict):
            yield order
        elif "order_id" in result:
            yield result
    elif isinstance(result, list):
        for item in result:
            if isinstance(item, dict) and "order_id" in item:
                yield item


class LinkOrders:
    """The ids of the still-open orders one owner (a local link, or a local client's HTTP
    requests) created, and how many of its buys, sells and edits are still unanswered: local
    COD must wait for those answers to learn what to cancel."""

    __slots__ = ("_open", "placing")

    def __init__(self) -> None:
        self._open: set[str] = set()
        self.placing = 0

    def __len__(self) -> int:
        return len(self._open)

    def sending(self, method: str) -> bool:
        """Note a request about to be relayed; True if it is one whose answer COD waits for."""
        placing = method in PLACING_METHODS
        self.placing += placing
        return placing

    def settled(self, placing: bool) -> None:
        """A request ``sending`` said was placing has its answer (or never will)."""
        self.placing -= placing

    def forget_all(self) -> None:
        """Deribit's own COD cancelled everything that went upstream: nothing is left open."""
        self._open.clear()

    def open_ids(self) -> list[str]:
        return sorted(self._open)

    def learn(self, method: str, result: Any) -> None:
        """Record what a relayed answer says about this link's orders.

        Only a buy or a sell makes an order this link's: Deribit's COD follows the connection
        that *created* an order, so a link that edits another link's order does not take it.
        """
        for order in orders_in(result):
            order_id, state = order.get("order_id"), order.get("order_state")
            if not isinstance(order_id, str) or not isinstance(state, str):
                continue
            if state in OPEN_STATES and method in CREATING_METHODS:
                self._open.add(order_id)
            elif state not in OPEN_STATES:
                self._open.discard(order_id)

    def observe(self, data: Any) -> None:
        """Forget orders that a notification (or another link's answer) shows closed."""
        if not self._open:
            return
        for order in orders_in(data):
            order_id, state = order.get("order_id"), order.get("order_state")
            if isinstance(order_id, str) and isinstance(state, str) and state not in OPEN_STATES:
                self._open.discard(order_id)
