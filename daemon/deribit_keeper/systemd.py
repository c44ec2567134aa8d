"""Tell systemd how the keeper is doing: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

This is the sd_notify(3) protocol, spoken from the Trio loop itself: one datagram of
newline-separated ``KEY=VALUE`` lines, sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a file system path, or an abstract socket written with a leading ``@``). It needs no libsystemd
and no thread: the sends happen on the same loop that serves the sessions, which is the point of
the watchdog. If the loop is stuck, the pings stop and systemd restarts the process.

Notifying is a courtesy to the service manager, never a reason to fail: every send is bounded in
time, and a socket that is missing, refuses or stays full is logged once
(``systemd.notify_failed``) and otherwise ignored.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Final, Protocol

import trio

from . import events
from .logs import get_logger
from .session import SessionState

# The event name; it belongs beside the others in events.py.
NOTIFY_FAILED: Final = events.SYSTEMD_NOTIFY_FAILED

# A datagram to a local socket is delivered at once or not at all; it can only wait when
# systemd's receive queue is full. One second of that is already a systemd in trouble, and the
# keeper's sessions must not wait on it any longer.
SEND_TIMEOUT_S: Final = 1.0

# `systemctl status` shows STATUS on one line; beyond this many names a count says the rest.
STATUS_MAX_NAMES: Final = 4


class _HasState(Protocol):
    """What ``status_line`` reads of a session: its state (``Session`` qualifies)."""

    @property
    def state(self) -> SessionState: ...


def _address(notify_socket: str) -> bytes:
    """The sockaddr_un path for a ``$NOTIFY_SOCKET`` value.

    ``@name`` is the abstract socket ``\\0name`` (systemd's own spelling of it); anything else
    must be an absolute path. (systemd >= 254 also knows ``vsock:`` addresses, for virtual
    machines; the keeper does not run as a VM's init, so they are not supported.)

    Raises:
        ValueError: neither an abstract socket nor an absolute path.
    """
    if notify_socket.startswith("@"):
        return b"\0" + os.fsencode(notify_socket[1:])
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    raise ValueError(f"unsupported NOTIFY_SOCKET address {notify_socket!r}")


def _field(key: str, value: str | int) -> str:
    # A newline inside a value would start a new field; systemd would read the rest as garbage.
    text = str(value).replace("\n", " ")
    return f"{key}={text}"


class Notifier:
    """Sends sd_notify datagrams to one ``$NOTIFY_SOCKET`` from the Trio loop.

    Each datagram goes out on a fresh socket, as libsystemd's sd_notify sends it: nothing stays
    open between sends, and whatever systemd has bound to the address now is what is reached.
    The socket is connected before sending so that a full queue at systemd's end makes the send
    wait (up to ``SEND_TIMEOUT_S``) until there is room: an unconnected datagram socket would only
    say EAGAIN, with no readiness to wait for.
    """

    def __init__(self, notify_socket: str) -> None:
        """Notify the socket named ``notify_socket`` (``/path`` or ``@abstract``).

        Raises:
            ValueError: an address of another kind.
        """
        self.notify_socket = notify_socket
        self._address = _address(notify_socket)
        # One datagram at a time, first come first served: the order of READY, STATUS and
        # STOPPING matters even when systemd's queue is full and the sends have to wait.
        self._lock = trio.Lock()
        self._failing = False
        self._closed = False
        self._log = get_logger()

    def __repr__(self) -> str:
        return f"<Notifier {self.notify_socket}>"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """A Notifier for ``$NOTIFY_SOCKET``; None when it is unset or empty (not under systemd).

        An address of a kind this module cannot reach is logged as ``systemd.notify_failed`` and
        also gives None: not being able to notify never stops the keeper from starting.
        """
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        if not value:
            return None
        try:
            return cls(value)
        except ValueError as exc:
            get_logger().warning(NOTIFY_FAILED, error=str(exc))
            return None

    async def send(self, message: str = "", /, **fields: str | int) -> bool:
        """Send one datagram: ``message`` as given, then each ``KEY=value`` of ``fields``.

        Returns whether it was sent. Never raises (except ``Cancelled``): a failure, or no
        delivery within ``SEND_TIMEOUT_S``, is logged as ``systemd.notify_failed`` the first time
        and silently dropped after that, until a send succeeds again.
        """
        lines = [message] if message else []
        lines += [_field(key, value) for key, value in fields.items()]
        datagram = "\n".join(lines).encode(errors="replace")
        if self._closed or not datagram:
            return False
        error = "timed out: systemd is not reading its notification socket"
        with trio.move_on_after(SEND_TIMEOUT_S):
            try:
                async with self._lock:
                    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                        await sock.connect(self._address)
                        await sock.send(datagram)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                self._failing = False
                return True
        if not self._failing:
            self._failing = True
            self._log.warning(NOTIFY_FAILED, error=error, notify_socket=self.notify_socket)
        return False

    async def ready(self) -> bool:
        """READY=1: startup (or a reload) is complete. Ends ``systemctl start``/``reload``."""
        return await self.send(READY=1)

    async def status(self, text: str) -> bool:
        """STATUS=text: the one line ``systemctl status`` shows under the unit."""
        return await self.send(STATUS=text)

    async def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC: a reload began; ``ready()`` ends it.

        systemd >= 253 wants the timestamp (CLOCK_MONOTONIC, microseconds) for
        Type=notify-reload, to tell this reload from an older one; earlier versions ignore it.
        It is the host's monotonic clock, not Trio's, which may be a test's virtual clock.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    async def stopping(self) -> bool:
        """STOPPING=1: a graceful stop began, so systemd shows the unit as deactivating."""
        return await self.send(STOPPING=1)

    async def watchdog(self) -> bool:
        """WATCHDOG=1: the loop is alive. See ``keep_watchdog_fed``."""
        return await self.send(WATCHDOG=1)

    async def aclose(self) -> None:
        """Stop notifying: later sends do nothing and return False.

        No socket outlives a send, so nothing needs releasing; this gives the keeper a definite
        point after which it no longer talks to systemd, as with any resource it owns.
        """
        self._closed = True
        await trio.lowlevel.checkpoint()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd's watchdog is off for us.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends: one late ping must not be
    fatal. Off means: WATCHDOG_USEC unset, not a positive integer, or WATCHDOG_PID set to a process
    other than this one (the variables were meant for a parent and leaked into our environment).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else os.getpid()
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


async def keep_watchdog_fed(notifier: Notifier, interval: float) -> None:
    """Send WATCHDOG=1 now and then every ``interval`` seconds, until cancelled.

    The pings come from ``trio.sleep`` on the keeper's own loop, deliberately not from a thread:
    a loop that is blocked or starved stops them, and after WatchdogSec systemd kills and
    restarts the process. A failed ping is only logged (by ``send``); systemd notices the gap.
    """
    while True:
        await notifier.watchdog()
        await trio.sleep(interval)


def status_line(sessions: Mapping[str, _HasState]) -> str:
    """The STATUS text for ``systemctl status``: ``"2/3 ready; not ready: hedge (backoff)"``.

    Accounts are listed by name, so the line changes only when a state does. After
    ``STATUS_MAX_NAMES`` of them the rest is a count (``+3 more``): the line must stay short,
    and /status has the full picture.
    """
    if not sessions:
        return "no accounts"
    waiting = sorted(
        (name, session.state.value)
        for name, session in sessions.items()
        if session.state is not SessionState.READY
    )
    line = f"{len(sessions) - len(waiting)}/{len(sessions)} ready"
    if not waiting:
        return line
    listed = ", ".join(f"{name} ({state})" for name, state in waiting[:STATUS_MAX_NAMES])
    more = len(waiting) - STATUS_MAX_NAMES
    return f"{line}; not ready: {listed}" + (f" +{more} more" if more > 0 else "")
