"""The simulator's market: two perpetuals with a book that never moves, and how they look.

Each instrument has a fixed best bid and ask. That is all an order needs to know whether it
would trade at once (it crosses the book) or rest; nothing else trades, so a resting order never
fills later (``Simulator.fill`` plays the counterparty when a test wants one). Objects are shaped
like Deribit's answers (``public/get_instruments``, ``public/get_currencies``, ``ticker.*`` and
``user.portfolio.*`` data, ``private/get_account_summary``) with plausible constants where a
real exchange has live numbers. Pure data and functions: no I/O, and the time is always passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

PERPETUAL_EXPIRY_MS: Final = 32503708800000  # Deribit's expiration_timestamp for perpetuals
INSTRUMENTS_CREATED_MS: Final = 1534242287000  # creation_timestamp reported for both
CURRENCIES: Final = ("BTC", "ETH", "USDC", "USDT", "EURR")  # what Deribit's enums list
TAKER_COMMISSION: Final = 0.0005
MAKER_COMMISSION: Final = 0.0


@dataclass(frozen=True, slots=True)
class Instrument:
    """One tradable instrument and its fixed top of book.

    Attributes:
        name: e.g. ``BTC-PERPETUAL``.
        currency: the base and settlement currency (an inverse perpetual settles in it).
        instrument_id: Deribit's numeric id.
        tick_size: prices move in steps of this.
        contract_size: USD per contract; ``amount`` is in USD for inverse perpetuals.
        min_trade_amount: the smallest ``amount`` an order may have on Deribit.
        best_bid: the price a sell at or below trades at.
        best_ask: the price a buy at or above trades at.
        book_amount: the size shown at the best bid and ask.
        max_leverage: as Deribit reports it.
        currency_long: the currency's name for people.
    """

    name: str
    currency: str
    instrument_id: int
    tick_size: float
    contract_size: float
    min_trade_amount: float
    best_bid: float
    best_ask: float
    book_amount: float
    max_leverage: int
    currency_long: str

    @property
    def mark_price(self) -> float:
        """The middle of the book; index and last price are the same."""
        return (self.best_bid + self.best_ask) / 2


INSTRUMENTS: Final[dict[str, Instrument]] = {
    "BTC-PERPETUAL": Instrument(
        name="BTC-PERPETUAL",
        currency="BTC",
        instrument_id=124972,
        tick_size=0.5,
        contract_size=10.0,
        min_trade_amount=10.0,
        best_bid=49995.0,
        best_ask=50005.0,
        book_amount=250_000.0,
        max_leverage=50,
        currency_long="Bitcoin",
    ),
    "ETH-PERPETUAL": Instrument(
        name="ETH-PERPETUAL",
        currency="ETH",
        instrument_id=124973,
        tick_size=0.05,
        contract_size=1.0,
        min_trade_amount=1.0,
        best_bid=2999.5,
        best_ask=3000.5,
        book_amount=120_000.0,
        max_leverage=50,
        currency_long="Ethereum",
    ),
}


def instruments_of(currency: str) -> list[Instrument]:
    """The instruments settled in ``currency`` (upper case), or all of them for ``any``."""
    return [i for i in INSTRUMENTS.values() if currency in ("any", i.currency)]


def instrument_object(instrument: Instrument) -> dict[str, Any]:
    """One entry of ``public/get_instruments``, as Deribit describes an inverse perpetual."""
    return {
        "instrument_name": instrument.name,
        "instrument_id": instrument.instrument_id,
        "kind": "future",
        "instrument_type": "reversed",
        "future_type": "reversed",
        "settlement_period": "perpetual",
        "base_currency": instrument.currency,
        "quote_currency": "USD",
        "counter_currency": "USD",
        "settlement_currency": instrument.currency,
        "price_index": f"{instrument.currency.lower()}_usd",
        "tick_size": instrument.tick_size,
        "tick_size_steps": [],
        "contract_size": instrument.contract_size,
        "min_trade_amount": instrument.min_trade_amount,
        "is_active": True,
        "rfq": False,
        "creation_timestamp": INSTRUMENTS_CREATED_MS,
        "expiration_timestamp": PERPETUAL_EXPIRY_MS,
        "maker_commission": MAKER_COMMISSION,
        "taker_commission": TAKER_COMMISSION,
        "max_leverage": instrument.max_leverage,
        "max_liquidation_commission": 0.0075,
        "block_trade_commission": 0.00025,
        "block_trade_min_trade_amount": 200_000,
        "block_trade_tick_size": 0.01,
    }


def currency_object(instrument: Instrument) -> dict[str, Any]:
    """One entry of ``public/get_currencies`` for the currency ``instrument`` settles in."""
    return {
        "currency": instrument.currency,
        "currency_long": instrument.currency_long,
        "coin_type": instrument.currency_long.upper(),
        "fee_precision": 4,
        "min_confirmations": 1,
        "min_withdrawal_fee": 0.0001,
        "withdrawal_fee": 0.0001,
        "withdrawal_priorities": [],
        "in_cross_collateral_pool": True,
    }


def ticker_object(instrument: Instrument, *, wall_now: float) -> dict[str, Any]:
    """The data of a ``ticker.{instrument}.100ms`` notification; only ``timestamp`` changes."""
    mark = instrument.mark_price
    return {
        "instrument_name": instrument.name,
        "timestamp": int(wall_now * 1000),
        "state": "open",
        "best_bid_price": instrument.best_bid,
        "best_bid_amount": instrument.book_amount,
        "best_ask_price": instrument.best_ask,
        "best_ask_amount": instrument.book_amount,
        "mark_price": mark,
        "index_price": mark,
        "last_price": mark,
        "settlement_price": mark,
        "estimated_delivery_price": mark,
        "min_price": round(mark * 0.98, 2),
        "max_price": round(mark * 1.02, 2),
        "open_interest": 1_000_000_000.0,
        "interest_value": 0.0,
        "funding_8h": 0.0,
        "current_funding": 0.0,
        "stats": {
            "high": instrument.best_ask,
            "low": instrument.best_bid,
            "price_change": 0.0,
            "volume": 10_000.0,
            "volume_usd": 10_000.0 * mark,
        },
    }


def portfolio_object(currency: str) -> dict[str, Any]:
    """The data of a ``user.portfolio.{currency}`` notification: a constant, healthy account.

    ``currency`` is reported upper case whatever case the channel name used.
    """
    balance = 10.0
    return {
        "currency": currency.upper(),
        "balance": balance,
        "equity": balance,
        "margin_balance": balance,
        "available_funds": balance,
        "available_withdrawal_funds": balance,
        "initial_margin": 0.0,
        "maintenance_margin": 0.0,
        "projected_initial_margin": 0.0,
        "projected_maintenance_margin": 0.0,
        "total_pl": 0.0,
        "session_upl": 0.0,
        "session_rpl": 0.0,
        "futures_pl": 0.0,
        "futures_session_upl": 0.0,
        "futures_session_rpl": 0.0,
        "options_pl": 0.0,
        "options_session_upl": 0.0,
        "options_session_rpl": 0.0,
        "options_value": 0.0,
        "options_delta": 0.0,
        "options_gamma": 0.0,
        "options_vega": 0.0,
        "options_theta": 0.0,
        "delta_total": 0.0,
        "projected_delta_total": 0.0,
        "fee_balance": 0.0,
        "additional_reserve": 0.0,
        "spot_reserve": 0.0,
        "estimated_liquidation_ratio": 0.0,
        "margin_model": "cross_sm",
        "cross_collateral_enabled": False,
        "portfolio_margining_enabled": False,
    }


def account_summary_object(currency: str) -> dict[str, Any]:
    """The result of ``private/get_account_summary``: the portfolio of ``portfolio_object``
    (Deribit's summary carries the same balance fields) and the account's kind.

    ``currency`` is reported upper case; ccxt's balance reads ``currency``, ``equity``,
    ``available_funds`` and ``maintenance_margin`` from it.
    """
    return {**portfolio_object(currency), "type": "main"}
