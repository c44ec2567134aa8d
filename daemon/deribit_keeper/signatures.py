"""Checking ``client_signature`` credentials: one implementation for every server side we run.

The simulator's ``public/auth`` and the gateway's local auth both accept a proof of the secret
instead of the secret itself (../shared/deribit-protocol.md, "public/auth"). Both must reject the
same things for the same reasons, so both use ``SignatureVerifier``; the HTTP variant of the
formula (``Authorization: deri-hmac-sha256 ...``) lives here too. This module imports nothing of
the keeper but ``protocol``, so the simulator may import it without importing the keeper.

Pure state, no I/O and no clock of its own: every check is told ``wall_now`` (epoch seconds).
"""

from __future__ import annotations

import hmac
import math
from typing import Final, Literal

from .protocol import sign

SIGNATURE_SKEW_S: Final = 5.0  # (choice, sheet "public/auth") timestamps further off are refused
MAX_NONCES_PER_CLIENT: Final = 10_000  # bounds memory per client; the oldest are forgotten first

_Reason = Literal["stale_timestamp", "bad_signature", "reused_nonce"]


class SignatureRejected(Exception):
    """A signature credential was refused; ``reason`` says which check failed.

    ``reason`` is a stable slug a caller maps to its answer (the simulator answers 13009 for all
    three) and may log: it never holds the signature, the nonce or the secret.
    """

    def __init__(self, reason: _Reason) -> None:
        self.reason: _Reason = reason
        super().__init__(f"signature rejected: {reason}")


class SignatureVerifier:
    """Checks client_signature auths: timestamp skew, HMAC, nonce reuse (per client_id).

    Checks run in this order: timestamp skew, signature, nonce reuse. A nonce is remembered only
    once its signature verified, so a stranger cannot burn a client's nonces by sending garbage
    with them. Nonces whose timestamp has left the skew window are forgotten: a replay of one
    fails the timestamp check anyway. Each client's table holds at most
    ``max_nonces_per_client`` nonces; past that the oldest remembered is forgotten first, so a
    replay of it inside the window would pass (a client that signs more than that many times in
    ``2 * skew_s`` seconds has worse problems). Tables exist only for client ids whose signature
    verified, so callers that check the client id is known first bound the number of tables.

    Args:
        skew_s: how far, in seconds, a signature's timestamp may be from ``wall_now``.
        max_nonces_per_client: the bound on each client's remembered nonces.

    Raises:
        ValueError: ``skew_s`` is not a positive finite number, or ``max_nonces_per_client``
            is less than 1.
    """

    def __init__(
        self,
        *,
        skew_s: float = SIGNATURE_SKEW_S,
        max_nonces_per_client: int = MAX_NONCES_PER_CLIENT,
    ) -> None:
        if not math.isfinite(skew_s) or skew_s <= 0:
            raise ValueError(f"skew_s must be a positive finite number, got {skew_s!r}")
        if max_nonces_per_client < 1:
            raise ValueError(f"max_nonces_per_client must be >= 1, got {max_nonces_per_client}")
        self._skew_s = float(skew_s)
        self._max_nonces = max_nonces_per_client
        # client_id -> nonce -> the timestamp (ms) it was signed with; dicts keep insertion order,
        # which is what "the oldest remembered is forgotten first" walks.
        self._nonces: dict[str, dict[str, int]] = {}

    def __repr__(self) -> str:
        remembered = sum(len(seen) for seen in self._nonces.values())
        return (
            f"SignatureVerifier(skew_s={self._skew_s}, clients={len(self._nonces)}, "
            f"nonces={remembered})"
        )

    def verify(
        self,
        client_id: str,
        secret: str,
        timestamp_ms: int,
        nonce: str,
        signature: str,
        data: str,
        *,
        wall_now: float,
    ) -> None:
        """Accept the credential, remembering its nonce, or raise.

        ``signature`` must be ``protocol.sign(secret, timestamp_ms, nonce, data)``; it is
        compared in constant time.

        Raises:
            SignatureRejected: ``stale_timestamp`` when ``timestamp_ms`` is more than ``skew_s``
                from ``wall_now`` (either way), ``bad_signature`` when the HMAC does not match,
                ``reused_nonce`` when this client already used ``nonce`` inside the window.
        """
        if abs(timestamp_ms / 1000 - wall_now) > self._skew_s:
            raise SignatureRejected("stale_timestamp")
        expected = sign(secret, timestamp_ms, nonce, data)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SignatureRejected("bad_signature")
        seen = self._nonces.setdefault(client_id, {})
        horizon_ms = (wall_now - self._skew_s) * 1000
        for old in [n for n, ts in seen.items() if ts < horizon_ms]:
            del seen[old]
        if nonce in seen:
            raise SignatureRejected("reused_nonce")
        seen[nonce] = timestamp_ms
        while len(seen) > self._max_nonces:
            del seen[next(iter(seen))]


def http_signature(
    secret: str, timestamp_ms: int, nonce: str, method: str, uri: str, body: str
) -> str:
    """The ``sig`` of an HTTP ``Authorization: deri-hmac-sha256`` header (lowercase hex).

    ``RequestData = UPPERCASE(method) + "\\n" + uri + "\\n" + body + "\\n"`` where ``uri`` is the
    path with its ``?query``; the HMAC-SHA256, keyed with the secret, runs over
    ``f"{timestamp_ms}\\n{nonce}\\n{RequestData}"`` (sheet, "The same API over HTTP"). That is
    ``protocol.sign`` with RequestData as its data, so both formulas share one HMAC.
    """
    return sign(secret, timestamp_ms, nonce, http_request_data(method, uri, body))


def http_request_data(method: str, uri: str, body: str) -> str:
    """The ``data`` an HTTP signature signs, so that ``SignatureVerifier.verify`` checks one."""
    return f"{method.upper()}\n{uri}\n{body}\n"
