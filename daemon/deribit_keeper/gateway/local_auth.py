"""The gateway's own authentication: its local clients, and tokens it issues itself.

A trading engine authenticates to the gateway exactly as it would to Deribit (``public/auth``
with ``client_credentials``, ``client_signature`` or ``refresh_token``), but with credentials the
operator gave the gateway, never Deribit's: the engine holds no exchange secret. Signatures are
checked by the same code as the simulator's (``signatures.py``: 5 s of skew, no nonce twice).

Tokens are random strings that mean something only to this gateway; Deribit never sees them.
(choice) They report Deribit's recorded production life, a year, and stay valid while the gateway
runs: the link's auth lasts as long as the link. Only the newest ``MAX_TOKENS`` are remembered.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

from ..config import GatewayConfig
from ..jsonrpc import RpcFault, get_choice, get_int, get_str, opt_str
from ..protocol import ErrorCode
from ..rest import Signed
from ..signatures import SignatureRejected, SignatureVerifier

GRANT_TYPES: Final = ("client_credentials", "client_signature", "refresh_token")
TOKEN_LIFE_S: Final = 31_536_000  # what Deribit's production answers report (sheet: public/auth)
MAX_TOKENS: Final = 10_000  # access and refresh tokens remembered per gateway; oldest forgotten
DEFAULT_SCOPE: Final = "connection mainaccount"  # Deribit's answer when no scope is asked for


def new_token() -> str:
    """A fresh random token (a function of its own, so the test suite can watch for leaks)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class LocalGrant:
    """What a successful local ``public/auth`` hands out; ``repr`` hides both tokens."""

    client_id: str
    scope: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)

    def result(self) -> dict[str, Any]:
        """The answer's ``result``, shaped as Deribit's."""
        return {
            "access_token": self.access_token,
            "expires_in": TOKEN_LIFE_S,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
            "token_type": "bearer",
            "enabled_features": [],
        }


class LocalAuth:
    """Checks local credentials and remembers the tokens this gateway issued."""

    def __init__(self, config: GatewayConfig) -> None:
        self._open = config.auth == "none"
        self._secrets = {c.client_id: c.client_secret for c in config.clients}
        self._verifier = SignatureVerifier()
        self._access: OrderedDict[str, str] = OrderedDict()  # token -> client_id
        self._refresh: OrderedDict[str, tuple[str, str]] = OrderedDict()  # -> client_id, scope

    @property
    def required(self) -> bool:
        """False with ``auth: none``: every link may use private methods without an auth."""
        return not self._open

    def __repr__(self) -> str:
        return f"<LocalAuth clients={sorted(self._secrets)} tokens={len(self._access)}>"

    def authenticate(self, params: dict[str, Any], *, wall_now: float) -> LocalGrant:
        """Answer one ``public/auth``.

        Raises:
            RpcFault: 13004 for an unknown client id or a wrong secret; 13009 for a bad
                signature, a stale timestamp, a reused nonce or an unknown refresh token;
                -32000/-32602 for missing or mistyped params.
        """
        grant_type = get_choice(params, "grant_type", GRANT_TYPES)
        scope = opt_str(params, "scope", "")
        if grant_type == "refresh_token":
            client_id, scope = self._redeem(get_str(params, "refresh_token"), scope)
        elif grant_type == "client_credentials":
            client_id = get_str(params, "client_id")
            self._check_secret(client_id, get_str(params, "client_secret"))
        else:
            client_id = get_str(params, "client_id")
            self._check_signature(client_id, params, wall_now)
        return self._issue(client_id, _shown_scope(scope), scope)

    def client_of(self, access_token: str) -> str | None:
        """The client an access token was issued to, or None for a token this gateway never
        issued (or has forgotten)."""
        return self._access.get(access_token)

    def revoke(self, grant: LocalGrant) -> None:
        """Forget a grant's tokens (``private/logout`` with ``invalidate_token``)."""
        self._access.pop(grant.access_token, None)
        self._refresh.pop(grant.refresh_token, None)

    def _check_secret(self, client_id: str, given: str) -> None:
        if self._open:
            return
        secret = self._secrets.get(client_id)
        if secret is None or not hmac.compare_digest(secret.reveal().encode(), given.encode()):
            raise RpcFault(ErrorCode.INVALID_CREDENTIALS)

    def _check_signature(self, client_id: str, params: dict[str, Any], wall_now: float) -> None:
        timestamp = get_int(params, "timestamp")
        nonce, signature = get_str(params, "nonce"), get_str(params, "signature")
        data = opt_str(params, "data", "")
        self.check_signed(Signed(client_id, timestamp, nonce, signature), data, wall_now=wall_now)

    def check_signed(self, signed: Signed, data: str, *, wall_now: float) -> str:
        """The client a signature over ``data`` proves (a ``client_signature`` auth, or an HTTP
        ``deri-hmac-sha256`` header over its RequestData), its nonce now used up; with
        ``auth: none`` the id it names, unchecked.

        Raises:
            RpcFault: 13004 for an unknown client id; 13009 for a bad signature, a stale
                timestamp or a reused nonce.
        """
        if self._open:
            return signed.client_id
        secret = self._secrets.get(signed.client_id)
        if secret is None:
            raise RpcFault(ErrorCode.INVALID_CREDENTIALS)
        try:
            self._verifier.verify(
                signed.client_id,
                secret.reveal(),
                signed.timestamp_ms,
                signed.nonce,
                signed.signature,
                data,
                wall_now=wall_now,
            )
        except SignatureRejected:
            raise RpcFault(ErrorCode.UNAUTHORIZED) from None
        return signed.client_id

    def _redeem(self, refresh_token: str, scope: str) -> tuple[str, str]:
        """A refresh token is good once; the new grant keeps its scope unless another is asked."""
        entry = self._refresh.pop(refresh_token, None)
        if entry is None:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        client_id, old_scope = entry
        return client_id, scope or old_scope

    def _issue(self, client_id: str, shown_scope: str, asked_scope: str) -> LocalGrant:
        grant = LocalGrant(client_id, shown_scope, new_token(), new_token())
        self._access[grant.access_token] = client_id
        self._refresh[grant.refresh_token] = (client_id, asked_scope)
        for tokens in (self._access, self._refresh):
            while len(tokens) > MAX_TOKENS:
                tokens.popitem(last=False)
        return grant


def _shown_scope(asked: str) -> str:
    """The scope a result reports: the one asked for (``session:NAME``, or the whole scope of an
    earlier answer, as NautilusTrader sends it again on reconnect), with ``mainaccount``."""
    if not asked:
        return DEFAULT_SCOPE
    words = asked.split()
    return asked if "mainaccount" in words else " ".join([*words, "mainaccount"])
