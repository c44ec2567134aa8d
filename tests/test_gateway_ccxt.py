"""ccxt itself (pinned in the test extras), unmodified, against the simulator and the gateway.

ccxt is the reason the gateway speaks HTTP: it places, lists and cancels orders over REST and
watches tickers and balances over the WebSocket. The same ccxt conversation runs directly
against the simulator and through the keeper's gateway, each configured only by its URLs; the
gateway's order must land on the keeper's COD-protected upstream connection.

ccxt runs on asyncio, so it is a child process (tests/clients/ccxt_trader.py), and this test
runs on the real clock: the keeper and the simulator wait on real sockets for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from deribit_keeper.simulator import Simulator

from .conftest import ENGINE, SIM_ACCOUNTS
from .gateway_support import gateway_account, run_keeper, upstream

TRADER = Path(__file__).with_name("clients") / "ccxt_trader.py"
RUN_TIMEOUT_S = 90.0


async def run_ccxt(port: int, key: str, secret: str) -> dict[str, Any]:
    """Run the ccxt trader against ``port`` (REST and WebSocket alike) and return what it saw."""
    env = {**os.environ, "DERIBIT_KEY": key, "DERIBIT_SECRET": secret}
    urls = [f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws/api/v2"]
    with trio.fail_after(RUN_TIMEOUT_S):
        done = await trio.run_process(
            [sys.executable, str(TRADER), *urls],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    seen: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return seen


def expected_shape(seen: dict[str, Any]) -> dict[str, Any]:
    """What must be the same whichever endpoint ccxt talked to."""
    return {
        "markets": seen["markets"],
        "ticker": isinstance(seen["ticker_last"], int | float),
        "balance": "BTC" in seen["balance_currencies"],
        "placed_open": seen["order_status"] == "open",
        "listed": seen["listed"] == [seen["order_id"]],
        "cancelled": seen["cancelled_status"] == "canceled",
        "after": seen["after"],
    }


async def test_ccxt_trades_through_the_gateway_exactly_as_against_deribit(
    nursery: trio.Nursery, sim: Simulator
) -> None:
    main = SIM_ACCOUNTS[0]
    sim_port = urlsplit(sim.url).port
    assert sim_port is not None
    direct = await run_ccxt(sim_port, main.client_id, main.client_secret)
    keeper = await run_keeper(nursery, gateway_account(sim))
    port = keeper.gateways["main"].port
    assert port is not None
    relayed = await run_ccxt(port, ENGINE.client_id, ENGINE.client_secret.reveal())
    want = {k: True for k in ("markets", "ticker", "balance", "placed_open", "listed", "cancelled")}
    assert expected_shape(direct) == expected_shape(relayed) == {**want, "after": []}
    [order] = [o for o in sim.orders("main-id") if o["order_id"] == relayed["order_id"]]
    assert order["cancel_reason"] == "user_request"
    protected = sim.orders("main-id", conn=upstream(sim))
    assert [o["order_id"] for o in protected] == [relayed["order_id"]]
