"""The methods the gateway never relays: key management and moving funds stay off the local hop.

A local client holds no exchange secret, and must not be able to read one, mint one, switch off
the keeper's key or move money out of the account through the gateway.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from deribit_keeper.gateway.policy import never_relayed
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator

from .gateway_support import gateway_account, http_private, local_client, run_keeper, upstream

REFUSED = [
    "private/list_api_keys",
    "private/create_api_key",
    "private/reset_api_key",
    "private/disable_api_key",
    "private/remove_api_key",
    "private/edit_api_key",
    "private/change_scope_in_api_key",
    "private/withdraw",
    "private/cancel_withdrawal",
    "private/submit_transfer_to_user",
    "private/submit_transfer_to_subaccount",
    "private/submit_transfer_between_subaccounts",
    "private/create_subaccount",
    "private/remove_subaccount",
    "private/add_to_address_book",
    "private/remove_from_address_book",
    "private/create_deposit_address",
    "public/fork_token",
    "public/exchange_token",
]
RELAYED = [
    "private/buy",
    "private/sell",
    "private/edit",
    "private/cancel",
    "private/cancel_all",
    "private/get_open_orders",
    "private/get_positions",
    "private/get_account_summary",
    "private/get_account_summaries",
    "private/get_subaccounts",
    "private/get_transfers",
    "private/get_withdrawals",
    "private/get_deposits",
    "public/get_instruments",
    "public/get_currencies",
]


@pytest.mark.parametrize("method", REFUSED)
def test_key_management_and_moving_funds_are_never_relayed(method: str) -> None:
    assert never_relayed(method)


@pytest.mark.parametrize("method", RELAYED)
def test_trading_and_reading_are_relayed(method: str) -> None:
    assert not never_relayed(method)


async def test_a_refused_method_gets_13021_over_both_transports_and_never_reaches_deribit(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    async with local_client(gateway) as engine:
        await engine.auth()
        answer = await engine.call("private/withdraw", {"currency": "BTC", "amount": 1})
        assert answer["error"]["code"] == ErrorCode.FORBIDDEN
    over_http = await http_private(gateway.port, "private/create_api_key", "max_scope=account")
    assert (over_http.status, over_http.body["error"]["code"]) == (400, ErrorCode.FORBIDDEN)
    sent = upstream(sim).methods()
    assert "private/withdraw" not in sent and "private/create_api_key" not in sent
