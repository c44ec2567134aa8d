"""Backoff rules: pure values, a seeded RNG, no I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deribit_keeper.backoff import Backoff, Severity, classify
from deribit_keeper.errors import ClosedAfterRateLimit, DeadLink, RpcError, SessionLost


def test_ceiling_doubles_from_initial_and_stops_at_max() -> None:
    """Each consecutive failure doubles the ceiling until the cap."""
    backoff = Backoff(initial=0.5, max=30.0)
    ceilings = []
    for _ in range(9):
        ceilings.append(backoff.ceiling())
        backoff = backoff.next()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_reset_starts_again_from_initial() -> None:
    """A stable connection makes the next failure wait as little as the first."""
    assert Backoff(0.5, 30.0, attempt=7).reset().ceiling() == 0.5


def test_transient_delays_are_jittered_within_the_ceiling() -> None:
    """Full jitter: delays spread over [0, ceiling], not one value repeated."""
    rng = random.Random(7)
    backoff = Backoff(1.0, 30.0, attempt=3)
    delays = [backoff.delay(rng) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) == 200
    assert min(delays) < 2.0 and max(delays) > 6.0


@pytest.mark.parametrize(
    ("severity", "floor"), [(Severity.RATE_LIMITED, 15.0), (Severity.PERSISTENT, 27.0)]
)
def test_slow_severities_wait_near_the_cap_from_the_first_failure(
    severity: Severity, floor: float
) -> None:
    """Rate limits wait max/2..max, operator problems 0.9*max..max, even at attempt 0."""
    rng = random.Random(1)
    delays = [Backoff(0.5, 30.0).delay(rng, severity) for _ in range(100)]
    assert all(floor <= d <= 30.0 for d in delays)
    assert len(set(delays)) == 100


@given(
    initial=st.floats(0.001, 100.0),
    cap=st.floats(0.001, 1000.0),
    attempt=st.integers(0, 10_000),
    seed=st.integers(0, 2**32),
)
def test_delay_never_exceeds_the_cap(initial: float, cap: float, attempt: int, seed: int) -> None:
    """Whatever the attempt count, no delay is negative or above max (no float overflow)."""
    backoff = Backoff(initial, max(cap, initial), attempt)
    for severity in Severity:
        assert 0.0 <= backoff.delay(random.Random(seed), severity) <= backoff.max


@pytest.mark.parametrize(
    ("lost", "severity"),
    [
        (SessionLost("connection_dropped"), Severity.TRANSIENT),
        (DeadLink(15.0), Severity.TRANSIENT),
        (ClosedAfterRateLimit("closed_by_server"), Severity.RATE_LIMITED),  # a relayed 10028
        (RpcError("public/auth", 10028, "too_many_requests"), Severity.RATE_LIMITED),
        (RpcError("public/hello", 10028, "too_many_requests"), Severity.RATE_LIMITED),
        (RpcError("public/auth", 13004, "invalid_credentials"), Severity.PERSISTENT),
        (RpcError("public/auth", 13009, "unauthorized"), Severity.PERSISTENT),
        (RpcError("private/get_cancel_on_disconnect", 13009, "unauthorized"), Severity.TRANSIENT),
        (RpcError("private/enable_cancel_on_disconnect", 13021, "forbidden"), Severity.PERSISTENT),
        (RpcError("public/auth", 13028, "temporarily_unavailable"), Severity.TRANSIENT),
    ],
)
def test_classify_sorts_failures_by_what_retrying_can_do(
    lost: SessionLost, severity: Severity
) -> None:
    """13009 is an operator problem on public/auth only; 10028 is a rate limit anywhere."""
    assert classify(lost) is severity
