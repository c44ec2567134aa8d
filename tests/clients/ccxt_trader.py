"""ccxt itself, unmodified, trading through a Deribit endpoint: run as a separate process.

ccxt is asyncio-based, so it runs in a process of its own (the tests run on Trio). It is pointed
at the endpoint by its URLs only, as a user would configure it, and does what a REST-trading
engine does: load the markets, watch a ticker and the balance over the WebSocket, then place,
list and cancel a limit order over REST. It prints one JSON line of what it saw; any exception
ends it with a traceback and a non-zero exit.

    DERIBIT_KEY=... DERIBIT_SECRET=... python ccxt_trader.py http://127.0.0.1:PORT ws://127.0.0.1:PORT/ws/api/v2
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import ccxt.pro

SYMBOL = "BTC/USD:BTC"  # ccxt's name for BTC-PERPETUAL
STEP_TIMEOUT_S = 15.0


async def trade(rest: str, ws: str) -> dict[str, Any]:
    exchange = ccxt.pro.deribit(
        {"apiKey": os.environ["DERIBIT_KEY"], "secret": os.environ["DERIBIT_SECRET"]}
    )
    exchange.urls["api"] = {"rest": rest, "ws": ws}
    try:
        markets = await asyncio.wait_for(exchange.load_markets(), STEP_TIMEOUT_S)
        ticker = await asyncio.wait_for(exchange.watch_ticker(SYMBOL), STEP_TIMEOUT_S)
        balance = await asyncio.wait_for(exchange.watch_balance(), STEP_TIMEOUT_S)
        order = await asyncio.wait_for(
            exchange.create_order(SYMBOL, "limit", "buy", 10, 40000), STEP_TIMEOUT_S
        )
        listed = await asyncio.wait_for(exchange.fetch_open_orders(SYMBOL), STEP_TIMEOUT_S)
        cancelled = await asyncio.wait_for(
            exchange.cancel_order(order["id"], SYMBOL), STEP_TIMEOUT_S
        )
        after = await asyncio.wait_for(exchange.fetch_open_orders(SYMBOL), STEP_TIMEOUT_S)
    finally:
        await exchange.close()
    return {
        "markets": SYMBOL in markets,
        "ticker_last": ticker.get("last"),
        # ccxt.pro's deribit keeps each currency's balance under its code
        "balance_currencies": sorted(k for k in balance if k.isupper()),
        "order_id": order["id"],
        "order_status": order["status"],
        "listed": [o["id"] for o in listed],
        "cancelled_status": cancelled["status"],
        "after": [o["id"] for o in after],
    }


def main() -> None:
    rest, ws = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(trade(rest, ws))))


if __name__ == "__main__":
    main()
