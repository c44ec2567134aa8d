"""Subscriptions: which channels exist, who may hold them, and who hears of an order change.

Channels simulated (names as in ../shared/deribit-protocol.md):

- ``user.orders.{instrument_name}.raw``, ``user.orders.{kind}.{currency}.raw`` (kind ``any`` or
  ``future``, currency ``any`` or one of ``market.CURRENCIES``; ``user.orders.any.any.raw`` is
  every order): one order object per change of any order of the account, whichever of the
  account's connections made it (Deribit sends ``user.*`` to every subscribed connection of the
  account).
- ``user.portfolio.{currency}``: the portfolio, once at subscribe and after every order change in
  that currency. The currency may be written in upper or lower case and is echoed as sent.
- ``ticker.{instrument_name}.100ms``: a ticker every 100 ms (the connection runs the pace).

**(choice)** A channel name the simulator does not know (an unknown instrument, a ``.100ms``
``user.orders`` variant, a channel Deribit has and the simulator lacks) is left out of the
result, which is what Deribit answers for an instrument it does not list (``"result": []``).
Any ``.raw`` channel asked for on ``public/subscribe`` without auth fails the whole request with
13778, as Deribit does; ``user.portfolio.*`` without auth fails it with **(choice)** 13009;
``private/subscribe`` without auth is 13009 like every private method. On an authenticated
connection ``public/subscribe`` takes ``user.*`` channels too. Pure state: the connection
record's ``channels`` list is the registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from deribit_keeper.jsonrpc import RpcFault, invalid
from deribit_keeper.protocol import ErrorCode

from .market import CURRENCIES, INSTRUMENTS, Instrument, portfolio_object
from .orders import OrderEvent
from .records import Call, Effect, Reply

TICKER_INTERVAL_S: Final = 0.1  # ticker.{instrument}.100ms

_PORTFOLIO_CURRENCY: Final = re.compile(r"[A-Z]{2,10}|[a-z]{2,10}")
_ORDER_KINDS: Final = ("any", "future")


@dataclass(frozen=True, slots=True)
class Channel:
    """A channel name understood: what it carries and for which instrument or currency."""

    name: str
    kind: Literal["orders", "portfolio", "ticker"]
    instrument: Instrument | None = None  # orders of one instrument; the ticker's instrument
    currency: str | None = None  # upper case; None for orders of every currency

    @property
    def private(self) -> bool:
        return self.kind != "ticker"

    def carries(self, event: OrderEvent) -> bool:
        """Whether a change of this order is sent on this ``user.orders`` channel."""
        if self.kind != "orders":
            return False
        if self.instrument is not None:
            return self.instrument.name == event.instrument_name
        return self.currency is None or self.currency == event.currency


def parse_channel(name: str) -> Channel | None:
    """The channel ``name`` stands for, or None when the simulator does not know it."""
    parts = name.split(".")
    if parts[:2] == ["user", "orders"] and parts[-1] == "raw":
        if len(parts) == 4 and parts[2] in INSTRUMENTS:
            return Channel(name, "orders", instrument=INSTRUMENTS[parts[2]])
        if len(parts) == 5 and parts[2] in _ORDER_KINDS:
            if parts[3] == "any":
                return Channel(name, "orders")
            if parts[3] in CURRENCIES:
                return Channel(name, "orders", currency=parts[3])
        return None
    if len(parts) == 3 and parts[:2] == ["user", "portfolio"]:
        if _PORTFOLIO_CURRENCY.fullmatch(parts[2]) and parts[2].lower() != "any":
            return Channel(name, "portfolio", currency=parts[2].upper())
        return None
    if len(parts) == 3 and parts[0] == "ticker" and parts[2] == "100ms":
        instrument = INSTRUMENTS.get(parts[1])
        return Channel(name, "ticker", instrument=instrument) if instrument else None
    return None


def tickers(channels: Iterable[str]) -> list[tuple[str, Instrument]]:
    """The ticker channels among ``channels``, with their instruments, in order."""
    found = []
    for name in channels:
        channel = parse_channel(name)
        if channel is not None and channel.kind == "ticker" and channel.instrument is not None:
            found.append((name, channel.instrument))
    return found


def fan_out(channels: Sequence[str], events: Sequence[OrderEvent]) -> list[tuple[str, Any]]:
    """The ``(channel, data)`` notifications one connection holding ``channels`` gets.

    ``events`` must all belong to the connection's account. Every event goes out on every
    ``user.orders`` channel that carries it, in event order; then each portfolio channel whose
    currency changed gets one portfolio.
    """
    parsed = [c for c in map(parse_channel, channels) if c is not None]
    out: list[tuple[str, Any]] = []
    for event in events:
        out += [(c.name, event.order) for c in parsed if c.carries(event)]
    changed = {event.currency for event in events}
    for channel in parsed:
        if channel.kind == "portfolio" and channel.currency in changed:
            out.append((channel.name, portfolio_object(channel.currency)))
    return out


class SubscriptionMethods:
    """``public/subscribe`` and friends, acting on the connection record's ``channels``.

    Args:
        client: the account a private request acts for (13009 without valid auth).
        maybe_client: the same, or None when the request has no auth at all.
    """

    def __init__(
        self, client: Callable[[Call], str], maybe_client: Callable[[Call], str | None]
    ) -> None:
        self._client = client
        self._maybe_client = maybe_client

    def methods(self) -> dict[str, Callable[[Call], Reply]]:
        """The JSON-RPC methods served here, by name."""
        return {
            "public/subscribe": self._public_subscribe,
            "private/subscribe": self._private_subscribe,
            "public/unsubscribe": self._unsubscribe,
            "private/unsubscribe": self._private_unsubscribe,
            "public/unsubscribe_all": self._unsubscribe_all,
            "private/unsubscribe_all": self._private_unsubscribe_all,
        }

    def _public_subscribe(self, call: Call) -> Reply:
        names = _channel_names(call.params)
        needs_auth = any(name.endswith(".raw") or name.startswith("user.") for name in names)
        if needs_auth and self._maybe_client(call) is None:
            raw = any(name.endswith(".raw") for name in names)
            raise RpcFault(
                ErrorCode.RAW_SUBSCRIPTIONS_NOT_AVAILABLE if raw else ErrorCode.UNAUTHORIZED
            )
        return self._subscribe(call, names)

    def _private_subscribe(self, call: Call) -> Reply:
        self._client(call)
        if "label" in call.params and not isinstance(call.params["label"], str):
            raise invalid("label")
        return self._subscribe(call, _channel_names(call.params))

    @staticmethod
    def _subscribe(call: Call, names: list[str]) -> Reply:
        held = call.connection().channels
        accepted: list[str] = []
        notices: list[tuple[str, Any]] = []
        for name in names:
            channel = parse_channel(name)
            if channel is None or name in accepted:
                continue
            accepted.append(name)
            if name not in held:
                held.append(name)
            if channel.kind == "portfolio" and channel.currency is not None:
                notices.append((name, portfolio_object(channel.currency)))
        return Reply(accepted, Effect.SUBSCRIPTIONS_CHANGED, notices=tuple(notices))

    def _unsubscribe(self, call: Call) -> Reply:
        held = call.connection().channels
        removed: list[str] = []
        for name in _channel_names(call.params):
            if name in held:
                held.remove(name)
                removed.append(name)
        return Reply(removed, Effect.SUBSCRIPTIONS_CHANGED)

    def _private_unsubscribe(self, call: Call) -> Reply:
        self._client(call)
        return self._unsubscribe(call)

    @staticmethod
    def _unsubscribe_all(call: Call) -> Reply:
        call.connection().channels.clear()
        return Reply("ok", Effect.SUBSCRIPTIONS_CHANGED)

    def _private_unsubscribe_all(self, call: Call) -> Reply:
        self._client(call)
        return self._unsubscribe_all(call)


def _channel_names(params: dict[str, Any]) -> list[str]:
    """The required ``channels`` param: a list of strings (-32000 absent, -32602 otherwise)."""
    if "channels" not in params:
        raise RpcFault(ErrorCode.MISSING_PARAMS)
    names = params["channels"]
    if not isinstance(names, list):
        raise invalid("channels", "value must be a list")
    if not all(isinstance(name, str) for name in names):
        raise invalid("channels", "value must be a list of strings")
    return names
