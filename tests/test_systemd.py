"""sd_notify over a real datagram socket, the watchdog's rhythm, STATUS text, and the unit file.

Every message test binds a real AF_UNIX datagram socket, once as a file system path and once as
an abstract socket, names it in NOTIFY_SOCKET, and reads exactly what systemd would read.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from deribit_keeper.cli import EX_CONFIG
from deribit_keeper.session import SessionState
from deribit_keeper.supervisor import SHUTDOWN_DEADLINE_S
from deribit_keeper.systemd import (
    NOTIFY_FAILED,
    SEND_TIMEOUT_S,
    STATUS_MAX_NAMES,
    Notifier,
    keep_watchdog_fed,
    status_line,
    watchdog_interval,
)

from .conftest import LogLines

UNIT = Path(__file__).parent.parent / "systemd" / "deribit-keeper.service"


@dataclass
class Listener:
    """The systemd end of NOTIFY_SOCKET: a bound datagram socket and its NOTIFY_SOCKET value."""

    raw: socket.socket
    notify_socket: str

    async def receive(self) -> bytes:
        """The next datagram (a hang guard, not a timing: virtual under autojump_clock)."""
        with trio.fail_after(60):
            return await trio.socket.from_stdlib_socket(self.raw).recv(65536)

    def nothing_queued(self) -> bool:
        """Whether no datagram is waiting, checked without a checkpoint."""
        try:
            self.raw.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False

    def notifier(self) -> Notifier:
        """A Notifier made the way the keeper makes it, from NOTIFY_SOCKET."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": self.notify_socket})
        assert notifier is not None
        return notifier


@pytest.fixture(params=["path", "abstract"])
async def listener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Listener]:
    """A bound AF_UNIX datagram socket, named by a path in tmp_path or as an abstract socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
        if request.param == "path":
            notify_socket = str(tmp_path / "notify")
            raw.bind(notify_socket)
        else:
            name = f"deribit-keeper-test-{os.getpid()}-{secrets.token_hex(4)}"
            notify_socket = "@" + name
            raw.bind(b"\0" + name.encode())
        yield Listener(raw, notify_socket)


# --- Messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("say", "datagram"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (
            lambda n: n.status("2/3 ready; not ready: hedge (backoff)"),
            b"STATUS=2/3 ready; not ready: hedge (backoff)",
        ),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.send("READY=1", STATUS="3/3 ready"), b"READY=1\nSTATUS=3/3 ready"),
        (lambda n: n.status("two\nlines"), b"STATUS=two lines"),
    ],
    ids=["ready", "status", "stopping", "watchdog", "send", "status-newline"],
)
async def test_each_message_arrives_as_one_exact_datagram(
    listener: Listener, say: Callable[[Notifier], Awaitable[bool]], datagram: bytes
) -> None:
    """Each notification is one datagram of KEY=VALUE lines, a newline in a value flattened."""
    notifier = listener.notifier()
    assert await say(notifier) is True
    assert await listener.receive() == datagram
    await notifier.aclose()


async def test_reloading_carries_the_host_monotonic_clock(listener: Listener) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC from CLOCK_MONOTONIC, as Type=notify-reload wants."""
    notifier = listener.notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    await notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = (await listener.receive()).split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after
    await notifier.aclose()


async def test_a_closed_notifier_sends_nothing(listener: Listener) -> None:
    """After aclose() sends are dropped quietly."""
    notifier = listener.notifier()
    await notifier.aclose()
    assert await notifier.ready() is False
    assert listener.nothing_queued()


# --- NOTIFY_SOCKET ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_no_notify_socket_means_no_notifier(value: str | None) -> None:
    """Outside systemd (NOTIFY_SOCKET unset or empty) there is nothing to notify."""
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert Notifier.from_environ(environ) is None


async def test_notify_socket_is_read_from_the_process_environment(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit mapping, from_environ() reads os.environ."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.notify_socket)
    notifier = Notifier.from_environ()
    assert notifier is not None
    assert repr(notifier) == f"<Notifier {listener.notify_socket}>"
    await notifier.ready()
    assert await listener.receive() == b"READY=1"


@pytest.mark.parametrize("value", ["run/notify", "vsock:2:1234"])
def test_an_unsupported_address_is_logged_not_fatal(log_lines: LogLines, value: str) -> None:
    """A relative or vsock NOTIFY_SOCKET gives no notifier and one systemd.notify_failed line."""
    assert Notifier.from_environ({"NOTIFY_SOCKET": value}) is None
    [event] = log_lines.events(NOTIFY_FAILED)
    assert repr(value) in event["error"]


# --- Failures never reach the keeper ------------------------------------------------------------


@pytest.mark.parametrize("socket_file", ["missing", "stale"])
async def test_an_unreachable_socket_is_logged_once_and_never_raises(
    tmp_path: Path, log_lines: LogLines, socket_file: str
) -> None:
    """A missing socket, or a stale one nobody has bound, logs systemd.notify_failed once."""
    path = tmp_path / "notify"
    if socket_file == "stale":
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(str(path))  # the file stays after close: connecting is refused
    notifier = Notifier(str(path))
    results = [
        await notifier.ready(),
        await notifier.status("0/1 ready"),
        await notifier.watchdog(),
        await notifier.stopping(),
    ]
    assert results == [False] * 4
    [event] = log_lines.events(NOTIFY_FAILED)
    expected = "FileNotFoundError" if socket_file == "missing" else "ConnectionRefusedError"
    assert event["error"].startswith(expected)
    assert event["notify_socket"] == str(path)
    assert event["level"] == "warning"


async def test_a_new_failure_after_a_success_is_logged_again(
    tmp_path: Path, log_lines: LogLines
) -> None:
    """Once a send got through, the next failure is news and is logged again."""
    path = tmp_path / "notify"
    notifier = Notifier(str(path))
    await notifier.ready()
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(str(path))
        assert await notifier.ready() is True
    path.unlink()
    await notifier.ready()
    await notifier.ready()
    assert len(log_lines.events(NOTIFY_FAILED)) == 2


async def test_a_full_queue_bounds_the_send(
    listener: Listener, log_lines: LogLines, autojump_clock: trio.testing.MockClock
) -> None:
    """When systemd does not read, a send gives up after SEND_TIMEOUT_S, logged once."""
    notifier = listener.notifier()
    sent = 0
    while await notifier.watchdog():  # nobody reads: the queue fills up
        sent += 1
        assert sent < 100_000
    started = trio.current_time()
    assert await notifier.status("still here") is False
    assert trio.current_time() - started == pytest.approx(SEND_TIMEOUT_S)
    [event] = log_lines.events(NOTIFY_FAILED)
    assert event["error"].startswith("timed out")


# --- Watchdog -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getppid())}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-1"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
    ids=[
        "set",
        "our-pid",
        "other-pid",
        "bad-pid",
        "unset",
        "empty",
        "zero",
        "negative",
        "not-a-number",
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    """Pings every WATCHDOG_USEC/2 s; none when unset, invalid, or meant for another PID."""
    assert watchdog_interval(environ) == interval


async def test_watchdog_pings_arrive_at_half_the_timeout(
    listener: Listener, autojump_clock: trio.testing.MockClock
) -> None:
    """keep_watchdog_fed pings at once and then every WATCHDOG_USEC/2, from the Trio loop."""
    interval = watchdog_interval({"WATCHDOG_USEC": "30000000"})
    assert interval == 15.0
    notifier = listener.notifier()
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(keep_watchdog_fed, notifier, interval)
        arrivals = []
        for _ in range(4):
            assert await listener.receive() == b"WATCHDOG=1"
            arrivals.append(trio.current_time() - started)
        nursery.cancel_scope.cancel()
    assert arrivals == pytest.approx([0.0, 15.0, 30.0, 45.0])


async def test_a_stuck_loop_stops_the_pings(listener: Listener) -> None:
    """The pings come from the loop itself: while it is blocked, none is sent (real time)."""
    notifier = listener.notifier()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_watchdog_fed, notifier, 0.001)
        assert await listener.receive() == b"WATCHDOG=1"
        while not listener.nothing_queued():
            pass  # drain
        # Block the loop for 50 pings' worth, as a stuck keeper would. The fault is the point.
        time.sleep(0.05)  # noqa: ASYNC251
        assert listener.nothing_queued()
        assert await listener.receive() == b"WATCHDOG=1"  # the loop runs again: pings resume
        nursery.cancel_scope.cancel()


# --- STATUS text --------------------------------------------------------------------------------


@dataclass
class _Stub:
    state: SessionState


R, B, C = SessionState.READY, SessionState.BACKOFF, SessionState.CONNECTING


@pytest.mark.parametrize(
    ("states", "line"),
    [
        ({"main": R, "hedge": R, "third": R}, "3/3 ready"),
        ({"main": R, "hedge": B, "third": R}, "2/3 ready; not ready: hedge (backoff)"),
        (
            {"main": C, "hedge": B, "third": R},
            "1/3 ready; not ready: hedge (backoff), main (connecting)",
        ),
        ({"main": SessionState.STOPPED}, "0/1 ready; not ready: main (stopped)"),
        ({}, "no accounts"),
        (
            {f"acct{i:02}": B for i in range(10)},
            "0/10 ready; not ready: acct00 (backoff), acct01 (backoff), acct02 (backoff), "
            "acct03 (backoff) +6 more",
        ),
    ],
    ids=["all-ready", "one-down", "sorted-by-name", "stopped", "none", "truncated"],
)
def test_status_line(states: dict[str, SessionState], line: str) -> None:
    """STATUS counts ready accounts and names the others by name, then only counts them."""
    assert STATUS_MAX_NAMES == 4
    assert status_line({name: _Stub(state) for name, state in states.items()}) == line


# --- The unit file ------------------------------------------------------------------------------


def _directives(unit: Path) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` of a unit file; repeated keys keep every value, as systemd."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def _seconds(span: str) -> float:
    """A systemd time span of one unit (``30s``, ``5min``, ``500ms``) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|)", span)
    assert match, span
    return float(match[1]) * {"ms": 0.001, "s": 1, "": 1, "min": 60}[match[2]]


def test_unit_file_has_the_required_directives() -> None:
    """The unit is Type=notify with a watchdog, reloads by SIGHUP and loads its secrets."""
    unit = _directives(UNIT)
    service = {key.removeprefix("Service."): values[-1] for key, values in unit.items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == [str(EX_CONFIG)]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert " run --config " in service["ExecStart"]
    assert service["ExecStart"].startswith("/usr/local/bin/deribit-keeper ")
    assert service["DynamicUser"] == "yes"
    assert service["ConfigurationDirectory"] == "deribit-keeper"
    assert re.fullmatch(r"[\w.-]+:/\S+", service["LoadCredential"])
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # systemd's WATCHDOG_USEC is WatchdogSec; the keeper pings at half of it.
    watchdog_usec = int(_seconds(service["WatchdogSec"]) * 1_000_000)
    assert watchdog_interval({"WATCHDOG_USEC": str(watchdog_usec)}) == 15.0
    # The keeper's 5 s shutdown promise fits, with room to spare, before systemd's SIGKILL.
    assert _seconds(service["TimeoutStopSec"]) >= 2 * (SHUTDOWN_DEADLINE_S + 0.5)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
def test_unit_exposure_level_is_at_most_2() -> None:
    """systemd-analyze security rates the unit's sandbox at an exposure level of 2.0 or lower."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0, result.stdout
