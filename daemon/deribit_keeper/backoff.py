"""When to try again after a lost connection.

A pure value, like urllib3's ``Retry``: no I/O and no clock, randomness injected, so the rules can
be tested exhaustively with a seeded RNG, while the session sleeps on Trio's clock.

The rules:

* transient failures (timeouts, closes, transport errors, 13028, anything unknown) wait a "full
  jitter" delay, uniform in ``[0, min(max, initial * 2**attempt)]`` (AWS architecture blog,
  "Exponential Backoff And Jitter"): many keepers restarting together spread out instead of
  hammering Deribit in lockstep;
* rate limiting (10028) waits uniform in ``[max / 2, max]`` from the first time: Deribit's credits
  need time to refill;
* failures retrying will not cure soon (13004, 13021, 13009 on ``public/auth``) wait at the cap,
  uniform in ``[0.9 * max, max]``: an operator has to fix a wrong key, so retrying faster only adds
  noise, and the tenth of jitter keeps many accounts from retrying in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final

from .errors import ClosedAfterRateLimit, RpcError, SessionLost
from .protocol import ErrorCode

# A connection that stayed ready this long was not flapping: the next failure starts from `initial`.
STABLE_AFTER_S: Final = 30.0


class Severity(Enum):
    """What retrying can do about a failure."""

    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    PERSISTENT = "persistent"


# Codes that need an operator, whatever method they answered.
_PERSISTENT_CODES: Final = frozenset({ErrorCode.INVALID_CREDENTIALS, ErrorCode.FORBIDDEN})


def classify(lost: SessionLost) -> Severity:
    """Sort a lost connection by what retrying can do about it.

    13009 on ``public/auth`` means the key, the signature or the clock is wrong: an operator
    problem. On any other method it only means the token lapsed, which a fresh connection cures.
    """
    if isinstance(lost, ClosedAfterRateLimit):
        return Severity.RATE_LIMITED
    if not isinstance(lost, RpcError):
        return Severity.TRANSIENT
    if lost.code == ErrorCode.TOO_MANY_REQUESTS:
        return Severity.RATE_LIMITED
    if lost.code in _PERSISTENT_CODES:
        return Severity.PERSISTENT
    if lost.code == ErrorCode.UNAUTHORIZED and lost.method == "public/auth":
        return Severity.PERSISTENT
    return Severity.TRANSIENT


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter and a cap.

    Attributes:
        initial: the ceiling of the first delay, in seconds.
        max: the cap on every delay, in seconds.
        attempt: how many consecutive failures came before this one (0 for the first).
    """

    initial: float
    max: float
    attempt: int = 0

    def next(self) -> Backoff:
        """The backoff after one more failure."""
        return replace(self, attempt=self.attempt + 1)

    def reset(self) -> Backoff:
        """The backoff after a connection proved stable."""
        return replace(self, attempt=0)

    def ceiling(self) -> float:
        """The largest delay this attempt may wait: ``initial * 2**attempt``, capped at ``max``."""
        # Cap the exponent: 2.0**1100 overflows a float, and past ~64 it is the cap anyway.
        return min(self.max, self.initial * 2.0 ** min(self.attempt, 64))

    def delay(self, rng: random.Random, severity: Severity = Severity.TRANSIENT) -> float:
        """Seconds to wait before the next attempt."""
        if severity is Severity.TRANSIENT:
            return rng.uniform(0.0, self.ceiling())
        if severity is Severity.RATE_LIMITED:
            return rng.uniform(self.max / 2, self.max)
        # Persistent: at the cap, with a tenth of jitter so many accounts sharing a broken key
        # do not retry in lockstep.
        return rng.uniform(self.max * 0.9, self.max)
