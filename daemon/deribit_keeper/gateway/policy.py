"""Which Deribit methods the gateway never relays: what a trading engine has no business doing.

The gateway's promise is that the engine holds no exchange secret. Relaying every private method
would break it at once: ``private/list_api_keys`` answers with every API key of the account and
its ``client_secret`` (it needs only scope ``account:read``, which the keeper's key usually has),
and ``create_api_key`` and ``reset_api_key`` hand out new ones. Others would let a local client
take the keeper's own key away (``disable_api_key``, ``remove_api_key``) or move money out of
the account (withdrawals, transfers, address books, subaccounts). (choice) These are answered
13021 ``forbidden``, Deribit's answer for a key that lacks the scope, and never reach Deribit;
reading methods (``get_...``) stay relayed, except the API-key list. An operator who needs them
uses Deribit's web UI or a key of their own, not the engine's gateway.
"""

from __future__ import annotations

from typing import Final

# Words that mark a method as key management, wherever they appear (list_api_keys included).
_ADMIN_WORDS: Final = ("api_key",)
# Words that mark a method as moving funds or changing the account, unless it only reads.
_FUNDS_WORDS: Final = ("withdraw", "transfer", "address_book", "deposit_address", "subaccount")
_ALSO: Final = frozenset(
    {"private/set_email_language", "private/set_self_trading_config"}
    | {"private/enable_affiliate_program", "private/toggle_notifications_from_subaccount"}
    | {"public/exchange_token", "public/fork_token"}  # would start a session of Deribit's own
)


def never_relayed(method: str) -> bool:
    """Whether ``method`` is refused by the gateway (13021) instead of being sent to Deribit."""
    if method in _ALSO or any(word in method for word in _ADMIN_WORDS):
        return True
    reads = method.startswith(("private/get_", "public/"))
    return not reads and any(word in method for word in _FUNDS_WORDS)
