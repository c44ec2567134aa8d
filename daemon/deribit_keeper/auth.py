"""Authentication on a connection: the params of each grant type, and when a token needs refreshing.

The keeper authenticates the connection itself (connection-scoped auth, Deribit's default), so no
token travels on later requests; the token is only kept to refresh the connection's auth before it
runs out. Tokens are held as ``Secret`` so that no repr or log line can show them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from .config import AccountConfig, Secret
from .errors import SessionLost
from .protocol import sign
from .rpc import RpcConnection

# Refresh once this share of the token's life has passed: 20% of the life is left as margin, which
# is hours for Deribit's usual tokens and still seconds for the shortest lives clients have seen.
REFRESH_AT_FRACTION: Final = 0.8

WallClock = Callable[[], float]

# The grant_type each configured `auth` method sends.
GRANT_OF: Final = {"signature": "client_signature", "credentials": "client_credentials"}


@dataclass(frozen=True, slots=True)
class Token:
    """The tokens of one authentication and when they were obtained (Trio time)."""

    access: Secret
    refresh: Secret
    expires_in: float
    obtained_at: float

    @property
    def refresh_at(self) -> float:
        """Trio time at which to refresh, well before ``expires_in`` runs out."""
        return self.obtained_at + self.expires_in * REFRESH_AT_FRACTION


def credential_params(
    account: AccountConfig, *, wall_clock: WallClock = time.time
) -> dict[str, Any]:
    """``public/auth`` params for the account's configured grant.

    ``signature`` (client_signature) signs a fresh timestamp and a random nonce, so the secret never
    crosses the wire and a captured request cannot be replayed.
    """
    if account.auth == "credentials":
        return {
            "grant_type": GRANT_OF["credentials"],
            "client_id": account.client_id,
            "client_secret": account.client_secret.reveal(),
        }
    timestamp = int(wall_clock() * 1000)
    nonce = secrets.token_urlsafe(12)
    return {
        "grant_type": GRANT_OF["signature"],
        "client_id": account.client_id,
        "timestamp": timestamp,
        "nonce": nonce,
        "data": "",
        "signature": sign(account.client_secret.reveal(), timestamp, nonce, ""),
    }


async def authenticate(
    rpc: RpcConnection, account: AccountConfig, *, wall_clock: WallClock = time.time
) -> Token:
    """Authenticate the connection with the account's credentials.

    Raises:
        RpcError: Deribit refused (13004 wrong key or secret, 13009 bad signature or clock).
        SessionLost: the answer did not hold usable tokens, or the request failed.
    """
    result = await rpc.call("public/auth", credential_params(account, wall_clock=wall_clock))
    return _token_from(result)


async def refresh(rpc: RpcConnection, token: Token) -> Token:
    """Renew the connection's auth with the refresh token, keeping the connection (and its COD)."""
    result = await rpc.call(
        "public/auth", {"grant_type": "refresh_token", "refresh_token": token.refresh.reveal()}
    )
    return _token_from(result)


def _token_from(result: object) -> Token:
    # Only these three fields matter; Deribit may leave out others (sid, state, enabled_features).
    if not isinstance(result, dict):
        raise SessionLost("malformed_answer", "public/auth result is not an object")
    access, refresh_token, expires_in = (
        result.get("access_token"),
        result.get("refresh_token"),
        result.get("expires_in"),
    )
    if not isinstance(access, str) or not isinstance(refresh_token, str):
        raise SessionLost("malformed_answer", "public/auth result lacks its tokens")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise SessionLost("malformed_answer", "public/auth result has no positive expires_in")
    return Token(Secret(access), Secret(refresh_token), float(expires_in), trio.current_time())
