"""The simulator's account-side state: API keys, tokens, signature nonces, account-level COD.

Pure state with no I/O and no clock of its own: every call is told ``now`` (Trio time, for token
lifetimes) and ``wall_now`` (epoch seconds, for signature timestamps and the look of tokens), so
the same code runs on Trio's autojump clock in tests and on real time from the CLI.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from deribit_keeper.jsonrpc import RpcFault
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.rest import Bearer, Signed
from deribit_keeper.signatures import SignatureRejected, SignatureVerifier

from .accounts import SimAccount, check_unique


@dataclass(frozen=True, slots=True)
class Grant:
    """What a successful ``public/auth`` hands out. ``repr`` hides both tokens."""

    client_id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int


@dataclass(slots=True)
class _Token:
    """One issued token. A session is one chain of grants: a first auth and its refreshes."""

    client_id: str
    kind: Literal["access", "refresh"]
    session: int
    expires_at: float  # Trio time
    revoked: bool = False


class Exchange:
    """Accounts and everything the server remembers about their credentials.

    (choice) A refresh token lives as long as its access token (``token_ttl_s``), the strictest
    reading of the sheet that still lets a client refresh before expiry; using one revokes it, but
    the access token issued with it stays valid until it expires.

    Args:
        accounts: the API keys accepted; client_ids must be unique.
        token_ttl_s: lifetime of access and refresh tokens, in seconds of Trio time.

    Raises:
        ValueError: duplicate client_id, or a non-positive ``token_ttl_s``.
    """

    def __init__(self, accounts: Iterable[SimAccount], *, token_ttl_s: float) -> None:
        if token_ttl_s <= 0:
            raise ValueError(f"token_ttl_s must be positive, got {token_ttl_s}")
        self._accounts = check_unique(accounts)
        self._token_ttl_s = token_ttl_s
        self._account_cod = dict.fromkeys(self._accounts, False)
        self._tokens: dict[str, _Token] = {}
        self._signatures = SignatureVerifier()
        self._sessions = itertools.count(1)
        self.issued_tokens: list[str] = []

    def __repr__(self) -> str:
        return f"Exchange(accounts={sorted(self._accounts)!r}, tokens={len(self._tokens)})"

    @property
    def accounts(self) -> list[SimAccount]:
        """The accepted API keys, in the order given."""
        return list(self._accounts.values())

    def account_cod(self, client_id: str) -> bool:
        """The stored account-level COD setting (scope ``account``).

        Raises:
            KeyError: no account has this client_id.
        """
        return self._account_cod[client_id]

    def set_account_cod(self, client_id: str, enabled: bool) -> None:
        """Store the account-level COD setting; connections already open keep theirs."""
        if client_id not in self._account_cod:
            raise KeyError(client_id)
        self._account_cod[client_id] = enabled

    def grant_client_credentials(
        self, client_id: str, client_secret: str, *, now: float, wall_now: float
    ) -> Grant:
        """``grant_type: client_credentials``: the secret itself crosses the wire.

        Raises:
            RpcFault: 13004 for an unknown client_id or a wrong secret.
        """
        account = self._accounts.get(client_id)
        if account is None or not hmac.compare_digest(
            account.client_secret.encode(), client_secret.encode()
        ):
            raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
        return self._issue(client_id, next(self._sessions), now=now, wall_now=wall_now)

    def grant_client_signature(
        self,
        client_id: str,
        timestamp_ms: int,
        nonce: str,
        signature: str,
        data: str,
        *,
        now: float,
        wall_now: float,
    ) -> Grant:
        """``grant_type: client_signature``: proof of the secret, which stays at home.

        The account is checked first, then ``deribit_keeper.signatures.SignatureVerifier``
        checks timestamp skew, signature and nonce reuse, in that order, with the rules the
        gateway's local auth shares (SIGNATURE_SKEW_S, nonces remembered per client_id).

        Raises:
            RpcFault: 13004 for an unknown client_id; 13009 for a timestamp more than
                SIGNATURE_SKEW_S from ``wall_now``, a signature that does not verify, or a nonce
                this client already used.
        """
        account = self._accounts.get(client_id)
        if account is None:
            raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
        try:
            self._signatures.verify(
                client_id,
                account.client_secret,
                timestamp_ms,
                nonce,
                signature,
                data,
                wall_now=wall_now,
            )
        except SignatureRejected as rejected:
            raise RpcFault(ErrorCode.UNAUTHORIZED) from rejected
        return self._issue(client_id, next(self._sessions), now=now, wall_now=wall_now)

    def grant_refresh_token(self, refresh_token: str, *, now: float, wall_now: float) -> Grant:
        """``grant_type: refresh_token``: a new pair in the same session; the old refresh dies.

        Raises:
            RpcFault: 13009 for a refresh token that is unknown, expired or revoked.
        """
        token = self._live(refresh_token, "refresh", now=now)
        token.revoked = True
        return self._issue(token.client_id, token.session, now=now, wall_now=wall_now)

    def authorize_http(
        self, credential: Bearer | Signed, request_data: str, *, now: float, wall_now: float
    ) -> str:
        """The account an HTTP request's ``Authorization`` header proves.

        A signed header is checked by the same ``SignatureVerifier`` as ``client_signature``
        auths, so a nonce used on a WebSocket cannot be replayed over HTTP, nor the other way
        round. ``request_data`` is ``signatures.http_request_data`` of the request as received.

        Raises:
            RpcFault: 13009 for a Bearer token that is not a live access token, and for a
                signature that is stale, does not verify or reuses a nonce; 13004 for an
                unknown client id.
        """
        if isinstance(credential, Bearer):
            return self.client_of(credential.token, now=now)
        account = self._accounts.get(credential.client_id)
        if account is None:
            raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
        try:
            self._signatures.verify(
                account.client_id,
                account.client_secret,
                credential.timestamp_ms,
                credential.nonce,
                credential.signature,
                request_data,
                wall_now=wall_now,
            )
        except SignatureRejected as rejected:
            raise RpcFault(ErrorCode.UNAUTHORIZED) from rejected
        return account.client_id

    def client_of(self, access_token: str, *, now: float) -> str:
        """The client_id an access token authenticates, if it is still valid.

        Raises:
            RpcFault: 13009 for an access token that is unknown, expired or revoked.
        """
        return self._live(access_token, "access", now=now).client_id

    def revoke_session(self, access_token: str) -> None:
        """Revoke every token of the session this access token belongs to (``private/logout``)."""
        token = self._tokens.get(access_token)
        if token is None:
            return
        for other in self._tokens.values():
            if other.session == token.session:
                other.revoked = True

    def _live(self, value: str, kind: Literal["access", "refresh"], *, now: float) -> _Token:
        token = self._tokens.get(value)
        if token is None or token.kind != kind or token.revoked or now >= token.expires_at:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        return token

    def _issue(self, client_id: str, session: int, *, now: float, wall_now: float) -> Grant:
        # Forgetting expired tokens keeps a long-running simulator small and changes no answer:
        # an unknown token gets the same 13009 as an expired one.
        for stale in [value for value, t in self._tokens.items() if now >= t.expires_at]:
            del self._tokens[stale]
        access = self._new_token(wall_now)
        refresh = self._new_token(wall_now)
        expires_at = now + self._token_ttl_s
        self._tokens[access] = _Token(client_id, "access", session, expires_at)
        self._tokens[refresh] = _Token(client_id, "refresh", session, expires_at)
        self.issued_tokens += [access, refresh]
        return Grant(client_id, access, refresh, expires_in=int(self._token_ttl_s))

    def _new_token(self, wall_now: float) -> str:
        """A fresh token shaped like Deribit's: ``<ms timestamp>.<8 chars>.<random>``."""
        while True:
            value = f"{int(wall_now * 1000)}.{secrets.token_urlsafe(6)}.{secrets.token_urlsafe(24)}"
            if value not in self._tokens:
                return value
