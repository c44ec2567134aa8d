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

    __slots__ = ("_followers", "_open", "placing")

    def __init__(self) -> None:
        self._open: set[str] = set()
        self.placing = 0
        # ticket of a placing request in flight -> the forks that must learn its answer too
        self._followers: dict[object, list[LinkOrders]] = {}

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

    def send(self, method: str) -> object | None:
        """Like ``sending``, for an owner that outlives its forks (a client's HTTP orders): a
        ticket to hand to ``answered``, or None for a request that places nothing."""
        if not self.sending(method):
            return None
        ticket = object()
        self._followers[ticket] = []
        return ticket

    def answered(self, ticket: object | None, method: str, result: Any) -> None:
        """A request ``send`` noted has its answer (``result`` None: it never will); this book
        and every fork made while it was in flight learn it."""
        books = [self]
        if ticket is not None:
            forks = self._followers.pop(ticket, [])
            books += forks
            self.placing -= 1
            for fork in forks:
                fork.placing -= 1
        if result is not None:
            for book in books:
                book.learn(method, result)

    def fork(self) -> LinkOrders:
        """What local COD cancels for an owner that goes on: the orders open now, and those the
        requests in flight now will create; orders placed afterwards are not in it (a client
        whose link died may reconnect and place new ones over HTTP at once)."""
        fork = LinkOrders()
        fork._open = set(self._open)
        fork.placing = len(self._followers)
        for forks in self._followers.values():
            forks.append(fork)
        return fork

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
