"""A keeper-wide ceiling on new connection attempts, so that a mass disconnect is no storm.

Full jitter spreads one account's retries, but a thousand accounts that lose their links in the
same millisecond (Deribit restarting a gateway, a network blip) draw their first delays from
the same short window (``backoff.initial``, half a second by default): the bench's reset of
1,000 links put every auth attempt inside one second, and the set-ups then queued for the CPU.
The pacer hands out connection attempts at ``rate`` a second after a burst of ``burst``: a few
accounts reconnect as fast as before, a thousand are spread evenly over a couple of seconds,
and Deribit sees a steady trickle from this host instead of a wall. Only retries are paced: a
keeper that starts connects every account at once, as fast as its CPU sets them up (pacing the
start too cost the bench's 1,000 accounts a second more until all were ready).

It is a virtual schedule (the "generic cell rate algorithm" of ATM networks, a token bucket
without a refill task): each caller takes the next free slot and sleeps until it. There is no
queue, no task and no polling, and it runs on Trio's clock, so tests see it in virtual time.
"""

from __future__ import annotations

import math
from typing import Final

import trio

# The keeper's own set-up costs about 2 ms of CPU on the bench machine (five round trips), so
# 500 a second is what one core sustains anyway, and 1,000 accounts take two seconds.
CONNECTS_PER_S: Final = 500.0
# Deribit allows 32 simultaneous connections per IP: a keeper within that is never slowed.
CONNECT_BURST: Final = 32


class ConnectPacer:
    """At most ``burst`` connection attempts at once, then ``rate`` a second."""

    def __init__(self, rate: float = CONNECTS_PER_S, burst: int = CONNECT_BURST) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a pacer needs a positive rate and a burst of at least one")
        self._spacing = 1.0 / rate
        self._tolerance = (burst - 1) * self._spacing  # how far ahead of schedule one may start
        self._due = -math.inf  # Trio time at which the next attempt would be exactly on schedule

    def next_start(self) -> float:
        """Book the next slot: the Trio time at which its attempt may start."""
        now = trio.current_time()
        due = max(self._due, now)
        self._due = due + self._spacing
        return max(now, due - self._tolerance)

    async def wait_turn(self) -> None:
        """Wait for this attempt's slot (a checkpoint even when it is free at once).

        A caller cancelled while waiting leaves its slot unused: the next ones are not moved
        forward, which only errs on the side of pacing.
        """
        await trio.sleep_until(self.next_start())
