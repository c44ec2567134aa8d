"""Simulator-wide fault injection: what the next requests or handshakes should suffer.

Tests and the demo arm a fault (``fail_next``, ``delay_next``, ``misreport_cod``,
``refuse_handshakes``) and the connections consume it as matching traffic arrives. Faults that
concern one connection (silence, a drop, raw frames) live on that connection instead. Pure state:
no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from deribit_keeper.protocol import ERROR_MESSAGES


@dataclass(slots=True)
class Failure:
    """An armed ``fail_next``: answer ``method`` with error ``code``, maybe closing afterwards."""

    method: str
    code: int
    remaining: int
    close_after: bool


@dataclass(slots=True)
class _Delay:
    method: str
    seconds: float
    remaining: int


@dataclass(slots=True)
class _Refusal:
    status: int
    remaining: int


def _check_times(times: int) -> None:
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be a positive integer, got {times!r}")


class Faults:
    """The armed faults, consumed first come, first served.

    Faults armed for the same method queue up: ``fail_next("public/test", 13028)`` then
    ``fail_next("public/test", 10028)`` fails the next call with 13028 and the one after with
    10028. A fault is consumed when a request arrives, in arrival order over all connections.
    """

    def __init__(self) -> None:
        self._failures: deque[Failure] = deque()
        self._delays: deque[_Delay] = deque()
        self._misreports = 0
        self._refusals: deque[_Refusal] = deque()

    def __repr__(self) -> str:
        return (
            f"Faults(failures={len(self._failures)}, delays={len(self._delays)}, "
            f"misreports={self._misreports}, refusals={len(self._refusals)})"
        )

    def fail_next(
        self, method: str, code: int, *, times: int = 1, close_after: bool = False
    ) -> None:
        """Arm: the next ``times`` calls of ``method`` get error ``code``.

        Raises:
            ValueError: ``code`` has no known Deribit message, or ``times`` < 1.
        """
        if code not in ERROR_MESSAGES:
            raise ValueError(f"no Deribit message known for error code {code}")
        _check_times(times)
        self._failures.append(Failure(method, int(code), times, close_after))

    def delay_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """Arm: the next ``times`` calls of ``method`` are handled only after ``seconds``.

        Raises:
            ValueError: ``seconds`` is negative or not finite, or ``times`` < 1.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        _check_times(times)
        self._delays.append(_Delay(method, float(seconds), times))

    def misreport_cod(self, *, times: int = 1) -> None:
        """Arm: the next ``times`` get_cancel_on_disconnect answers say ``enabled: false``."""
        _check_times(times)
        self._misreports += times

    def refuse_handshakes(self, n: int, status: int = 429) -> None:
        """Arm: reject the next ``n`` WebSocket handshakes with HTTP ``status``.

        Raises:
            ValueError: ``n`` < 1, or ``status`` is not an HTTP error status (400-599).
        """
        _check_times(n)
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), got {status}")
        self._refusals.append(_Refusal(status, n))

    def take_failure(self, method: str) -> Failure | None:
        """Consume one armed failure for ``method``, if any."""
        for failure in self._failures:
            if failure.method == method:
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    def take_delay(self, method: str) -> float:
        """Consume one armed delay for ``method``; 0.0 when none is armed."""
        for delay in self._delays:
            if delay.method == method:
                delay.remaining -= 1
                if delay.remaining == 0:
                    self._delays.remove(delay)
                return delay.seconds
        return 0.0

    def take_misreport(self) -> bool:
        """Consume one armed COD misreport, if any."""
        if self._misreports == 0:
            return False
        self._misreports -= 1
        return True

    def take_refusal(self) -> int | None:
        """Consume one armed handshake refusal; its HTTP status, or None."""
        if not self._refusals:
            return None
        refusal = self._refusals[0]
        refusal.remaining -= 1
        if refusal.remaining == 0:
            self._refusals.popleft()
        return refusal.status
