"""Simulator-wide fault injection: what the next requests or handshakes should suffer.

Tests and the demo arm a fault (``fail_next``, ``delay_next``, ``break_next``,
``misreport_cod``, ``refuse_handshakes``, ``break_handshakes``) and the connections consume it as
matching traffic arrives. Faults that concern one connection (silence, a drop, raw frames) live
on that connection instead. Pure state: no I/O, no clock; whoever consumes a fault notes when in
``triggered`` (Trio time passed in), so a test can measure how long the client took to notice.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

from deribit_keeper.jsonrpc import RpcFault
from deribit_keeper.protocol import ERROR_MESSAGES

# How a connection can break instead of answering one request (``break_next``):
#   close:   a close frame with ``code`` (1000, 1001, 1011, ...), as a server closing on purpose;
#   eof:     the TCP connection closed (FIN) with no close frame: the client sees 1006;
#   reset:   the TCP connection reset (RST): a crashed server or a middlebox;
#   silence: nothing more is sent or answered, TCP stays open: a blackhole;
#   frame:   ``frame`` (text, or bytes for a binary frame) is sent instead of the answer.
Breakage = Literal["close", "eof", "reset", "silence", "frame"]
BREAKAGES: Final[frozenset[str]] = frozenset({"close", "eof", "reset", "silence", "frame"})
# How a WebSocket handshake can go wrong after its request was read (``break_handshakes``):
#   blackhole: nothing is ever answered, TCP stays open;
#   stall:     the first line of a 101 answer is sent, then nothing: a half-finished handshake;
#   delay:     the handshake is answered only after ``seconds``;
#   reset / eof: the TCP connection is reset, or closed, without an answer;
#   garbage:   bytes that are not HTTP come back, then the connection closes;
#   oversized: a 101 answer whose head is far beyond any client's limit (256 kB).
HandshakeBreakage = Literal["blackhole", "stall", "delay", "reset", "eof", "garbage", "oversized"]
HANDSHAKE_BREAKAGES: Final[frozenset[str]] = frozenset(
    {"blackhole", "stall", "delay", "reset", "eof", "garbage", "oversized"}
)


@dataclass(slots=True)
class Failure:
    """An armed ``fail_next``: answer ``method`` with error ``code``, maybe closing afterwards."""

    method: str
    code: int
    remaining: int
    close_after: bool
    message: str | None = None  # for a code Deribit's table lacks (e.g. -32603 Internal error)

    def fault(self) -> RpcFault:
        """The error to answer with: Deribit's own message for the code unless one was given."""
        if self.message is None:
            return RpcFault(self.code)
        return _OtherFault(self.code, self.message)


class _OtherFault(RpcFault):
    """An error answer with any code and message, for codes ``RpcFault`` has no message for."""

    def __init__(self, code: int, message: str) -> None:
        # Not RpcFault.__init__: it refuses a code without a known message, this class's point.
        Exception.__init__(self, f"{code} {message}")
        self.code, self.message = code, message
        self.param = self.reason = None


@dataclass(frozen=True, slots=True)
class Break:
    """An armed ``break_next``: what happens instead of the answer to ``method``."""

    method: str
    how: Breakage
    code: int = 1000
    frame: str | bytes = field(default="", repr=False)


@dataclass(slots=True)
class _Breaks:
    fault: Break
    remaining: int


@dataclass(frozen=True, slots=True)
class HandshakeBreak:
    """An armed ``break_handshakes``: how the next WebSocket handshake goes wrong."""

    how: HandshakeBreakage
    seconds: float = 0.0  # for ``delay``


@dataclass(slots=True)
class _HandshakeBreaks:
    fault: HandshakeBreak
    remaining: int


@dataclass(frozen=True, slots=True)
class Triggered:
    """One armed fault that took effect: when (Trio time), which, and on what connection
    (None for a handshake, which has no connection record yet)."""

    at: float
    fault: str
    conn: int | None = None


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
        self._breaks: deque[_Breaks] = deque()
        self._handshake_breaks: deque[_HandshakeBreaks] = deque()
        self.triggered: list[Triggered] = []

    def __repr__(self) -> str:
        return (
            f"Faults(failures={len(self._failures)}, delays={len(self._delays)}, "
            f"misreports={self._misreports}, refusals={len(self._refusals)}, "
            f"breaks={len(self._breaks)}, handshake_breaks={len(self._handshake_breaks)})"
        )

    def fail_next(
        self,
        method: str,
        code: int,
        *,
        times: int = 1,
        close_after: bool = False,
        message: str | None = None,
    ) -> None:
        """Arm: the next ``times`` calls of ``method`` get error ``code`` (with ``message``, or
        Deribit's own message for it).

        Raises:
            ValueError: ``code`` has no known Deribit message and none is given, or ``times`` < 1.
        """
        if code not in ERROR_MESSAGES and message is None:
            raise ValueError(f"no Deribit message known for error code {code}")
        _check_times(times)
        self._failures.append(Failure(method, int(code), times, close_after, message))

    def break_next(
        self,
        method: str,
        how: Breakage,
        *,
        code: int = 1000,
        frame: str | bytes = "",
        times: int = 1,
    ) -> None:
        """Arm: the next ``times`` calls of ``method`` are not answered; the connection breaks
        ``how`` (see ``Breakage``) instead.

        Raises:
            ValueError: an unknown ``how``, a close ``code`` outside 1000-4999 (or one no close
                frame may carry: 1005, 1006, 1015), or ``times`` < 1.
        """
        if how not in BREAKAGES:
            raise ValueError(f"how must be one of {sorted(BREAKAGES)}, got {how!r}")
        if how == "close" and (not 1000 <= code <= 4999 or code in (1005, 1006, 1015)):
            raise ValueError(f"a close frame cannot carry code {code} (use how='eof' for 1006)")
        _check_times(times)
        self._breaks.append(_Breaks(Break(method, how, code, frame), times))

    def break_handshakes(self, n: int, how: HandshakeBreakage, *, seconds: float = 0.0) -> None:
        """Arm: the next ``n`` WebSocket handshakes go wrong ``how`` (see ``HandshakeBreakage``).

        Raises:
            ValueError: an unknown ``how``, a negative or infinite ``seconds``, or ``n`` < 1.
        """
        if how not in HANDSHAKE_BREAKAGES:
            raise ValueError(f"how must be one of {sorted(HANDSHAKE_BREAKAGES)}, got {how!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        _check_times(n)
        self._handshake_breaks.append(_HandshakeBreaks(HandshakeBreak(how, seconds), n))

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

    def take_break(self, method: str) -> Break | None:
        """Consume one armed break for ``method``, if any."""
        for armed in self._breaks:
            if armed.fault.method == method:
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._breaks.remove(armed)
                return armed.fault
        return None

    def take_handshake_break(self) -> HandshakeBreak | None:
        """Consume one armed handshake break, if any."""
        if not self._handshake_breaks:
            return None
        armed = self._handshake_breaks[0]
        armed.remaining -= 1
        if armed.remaining == 0:
            self._handshake_breaks.popleft()
        return armed.fault

    def note(self, at: float, fault: str, conn: int | None = None) -> None:
        """Record that a fault took effect at Trio time ``at``."""
        self.triggered.append(Triggered(at, fault, conn))
