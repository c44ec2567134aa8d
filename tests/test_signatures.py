"""Tests of the shared signature checks: skew edges, bad signatures, nonce reuse and memory.

Pure functions and state, no I/O: every check is told the wall clock, so none needs Trio.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from deribit_keeper.protocol import sign
from deribit_keeper.signatures import (
    MAX_NONCES_PER_CLIENT,
    SIGNATURE_SKEW_S,
    SignatureRejected,
    SignatureVerifier,
    http_signature,
)

NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)
SECRET = "verifier-secret"


def check(
    verifier: SignatureVerifier,
    nonce: str = "n-1",
    *,
    timestamp_ms: int = NOW_MS,
    wall_now: float = NOW,
    secret: str = SECRET,
    data: str = "",
    client_id: str = "client",
) -> None:
    """Verify a signature made with ``secret`` against the verifier's SECRET."""
    signature = sign(secret, timestamp_ms, nonce, data)
    verifier.verify(client_id, SECRET, timestamp_ms, nonce, signature, data, wall_now=wall_now)


def reason_of(verifier: SignatureVerifier, nonce: str = "n-1", **kwargs: Any) -> str:
    """The reason ``check`` is rejected with."""
    with pytest.raises(SignatureRejected) as rejected:
        check(verifier, nonce, **kwargs)
    return rejected.value.reason


def test_defaults_follow_the_sheet() -> None:
    """The skew is 5 s and each client remembers at most 10,000 nonces."""
    assert SIGNATURE_SKEW_S == 5.0
    assert MAX_NONCES_PER_CLIENT == 10_000


def test_a_correct_signature_is_accepted_with_and_without_data() -> None:
    """A signature over timestamp, nonce and data, keyed with the secret, verifies."""
    verifier = SignatureVerifier()
    check(verifier, "a")
    check(verifier, "b", data="extra data")


@pytest.mark.parametrize("offset_ms", [-5000, 5000, 0, -1, 1])
def test_timestamps_up_to_the_skew_either_way_are_accepted(offset_ms: int) -> None:
    """A timestamp exactly SIGNATURE_SKEW_S early or late still verifies."""
    check(SignatureVerifier(), timestamp_ms=NOW_MS + offset_ms)


@pytest.mark.parametrize("offset_ms", [-5001, 5001, -60_000])
def test_timestamps_beyond_the_skew_are_stale(offset_ms: int) -> None:
    """A timestamp more than SIGNATURE_SKEW_S from the clock is refused as stale."""
    assert reason_of(SignatureVerifier(), timestamp_ms=NOW_MS + offset_ms) == "stale_timestamp"


def test_skew_is_configurable() -> None:
    """With skew_s 1, a timestamp 2 s old is stale and one 1 s old is not."""
    verifier = SignatureVerifier(skew_s=1.0)
    check(verifier, "a", timestamp_ms=NOW_MS - 1000)
    assert reason_of(verifier, "b", timestamp_ms=NOW_MS - 2000) == "stale_timestamp"


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"secret": "someone-else"}, id="wrong-secret"),
        pytest.param({"data": "other"}, id="data-not-signed"),
    ],
)
def test_a_signature_that_does_not_match_is_bad(kwargs: dict[str, str]) -> None:
    """A signature made with another secret, or over other data, is refused as bad."""
    verifier = SignatureVerifier()
    signature = sign(kwargs.get("secret", SECRET), NOW_MS, "n", "")
    with pytest.raises(SignatureRejected) as rejected:
        verifier.verify("c", SECRET, NOW_MS, "n", signature, kwargs.get("data", ""), wall_now=NOW)
    assert rejected.value.reason == "bad_signature"


def test_a_signature_in_upper_case_or_with_non_ascii_is_bad() -> None:
    """The comparison is exact: upper-case hex or non-ASCII text never verifies."""
    verifier = SignatureVerifier()
    good = sign(SECRET, NOW_MS, "n", "")
    for signature in (good.upper(), good[:-1] + "é"):
        with pytest.raises(SignatureRejected) as rejected:
            verifier.verify("c", SECRET, NOW_MS, "n", signature, "", wall_now=NOW)
        assert rejected.value.reason == "bad_signature"


def test_the_timestamp_is_checked_before_the_signature() -> None:
    """A stale timestamp with a bad signature is reported as stale."""
    assert reason_of(SignatureVerifier(), secret="x", timestamp_ms=NOW_MS - 9000) == (
        "stale_timestamp"
    )


def test_a_reused_nonce_is_refused() -> None:
    """A nonce this client already used inside the window is refused as reused."""
    verifier = SignatureVerifier()
    check(verifier, "once")
    assert reason_of(verifier, "once", timestamp_ms=NOW_MS + 1) == "reused_nonce"


def test_nonces_are_per_client() -> None:
    """Another client may use the same nonce."""
    verifier = SignatureVerifier()
    check(verifier, "shared", client_id="a")
    check(verifier, "shared", client_id="b")


def test_a_bad_signature_does_not_burn_the_nonce() -> None:
    """A nonce sent with a signature that does not verify can still be used by the client."""
    verifier = SignatureVerifier()
    assert reason_of(verifier, "mine", secret="attacker") == "bad_signature"
    check(verifier, "mine")


def test_a_nonce_is_forgotten_once_its_timestamp_leaves_the_window() -> None:
    """Six seconds later the old nonce verifies again with a fresh timestamp."""
    verifier = SignatureVerifier()
    check(verifier, "again")
    later = NOW + 6
    check(verifier, "again", timestamp_ms=int(later * 1000), wall_now=later)
    assert reason_of(verifier, "again", timestamp_ms=int(later * 1000), wall_now=later) == (
        "reused_nonce"
    )


def test_memory_per_client_is_bounded_oldest_forgotten_first() -> None:
    """Past max_nonces_per_client, the oldest nonce is forgotten and the newer are kept."""
    verifier = SignatureVerifier(max_nonces_per_client=3)
    for nonce in ("n1", "n2", "n3", "n4"):
        check(verifier, nonce)
    assert "nonces=3" in repr(verifier)
    check(verifier, "n1")  # forgotten, so accepted again (and now n2 is the oldest)
    for kept in ("n3", "n4", "n1"):
        assert reason_of(verifier, kept) == "reused_nonce"
    check(verifier, "n2")


@pytest.mark.parametrize(
    "kwargs",
    [{"skew_s": 0.0}, {"skew_s": -1.0}, {"skew_s": float("inf")}, {"max_nonces_per_client": 0}],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any]) -> None:
    """A non-positive or infinite skew, or a nonce bound below 1, is a ValueError."""
    with pytest.raises(ValueError):
        SignatureVerifier(**kwargs)


def test_rejection_messages_name_only_the_reason() -> None:
    """A rejection's text names the failed check and never the secret or the signature."""
    verifier = SignatureVerifier()
    signature = sign("wrong", NOW_MS, "nonce-x", "")
    with pytest.raises(SignatureRejected) as rejected:
        verifier.verify("c", SECRET, NOW_MS, "nonce-x", signature, "", wall_now=NOW)
    assert str(rejected.value) == "signature rejected: bad_signature"
    assert SECRET not in repr(verifier)


def test_http_signature_follows_the_sheet() -> None:
    """The HTTP signature is HMAC-SHA256 over ts, nonce and RequestData, method upper-cased."""
    uri = "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10"
    message = f"{NOW_MS}\nabc\nGET\n{uri}\n\n".encode()
    expected = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert http_signature(SECRET, NOW_MS, "abc", "get", uri, "") == expected
    assert http_signature(SECRET, NOW_MS, "abc", "POST", uri, "{}") != expected
