"""What the gateway adds: round-trip latency and sustained throughput, relayed versus direct.

The gateway puts the keeper between a trading engine and Deribit, so every order pays for one
more hop (a WebSocket frame read, parsed, relayed over the keeper's session, and its answer
written back). The issue sets targets for that cost: at most 150 us added at p50 and 1 ms at
p99. This measures it the only honest way on a noisy machine: the simulator and the keeper run as
separate processes on loopback (so the keeper's work is its own), and this process sends the same
request to the gateway and to the simulator directly, one after the other, so both series see
the same noise. Then it drives pipelined load through 1 and 8 local links, and the same load at
the simulator directly, for the throughput one account can carry. The simulator script, the
/proc CPU reader and the pinning are procs.py's, so every benchmark here measures alike. run.py
runs this as part of ``make bench`` (``measure``), pinned: the simulator and this process (the
engine) on one core, the keeper and the bare relays on the other.

Part of any hop's cost is not the gateway's: WebSocket framing in Python, Trio's scheduling, a
send() per frame. To tell that floor from the gateway's own work, two bare relays run beside
the keeper, each its own process (bare_relay.py): one WebSocket in, one trio-websocket client
out per connection, every message copied both ways unparsed. ``bare`` accepts with
trio-websocket's server, ``bare-hc`` with hypercorn (as the gateway does). The same request goes
through all four paths in every round, in a shuffled order, so the floor and the gateway are
measured side by side; "gateway - bare" is then what the gateway adds beyond any Python hop.

A measurement, not a test: PASS/OVER is printed beside each target, and the exit code is 0
whatever the figures (it is 1 only when the benchmark itself cannot run).

    python bench/gateway_roundtrip.py --requests 5000 --seconds 5
    python bench/gateway_roundtrip.py --profile /tmp/keeper.prof   # the keeper under cProfile
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from procs import SIMULATOR, cores, cpu_seconds, pin
from trio_websocket import WebSocketConnection, open_websocket_url

METHOD: Final = "private/get_open_orders_by_currency"
PARAMS: Final = {"currency": "BTC"}
# procs.py's simulator script, with one account: a0 / id0 / secret0.
SIM_ACCOUNT: Final = {
    "grant_type": "client_credentials",
    "client_id": "id0",
    "client_secret": "secret0",
}
LOCAL_CLIENT: Final = {
    "grant_type": "client_credentials",
    "client_id": "engine",
    "client_secret": "engine-secret",
}
TARGET_P50_US: Final = 150.0  # from the issue: what the gateway may add at p50...
TARGET_P99_US: Final = 1000.0  # ...and at p99
STARTUP_TIMEOUT_S: Final = 30.0
DRAIN_TIMEOUT_S: Final = 10.0  # answers still owed after a throughput run; longer is a stall
STOP_TIMEOUT_S: Final = 10.0  # the keeper stops within 5 s; cProfile's dump takes a moment more
LOAD_WARMUP_S: Final = 0.5  # of each throughput run, not counted
BARE_RELAY: Final = Path(__file__).with_name("bare_relay.py")
# The paths a request can take, in the tables' order: name -> what it is.
PATHS: Final = {
    "direct": "the simulator itself",
    "bare": "bare_relay.py: trio-websocket server",
    "bare-hc": "bare_relay.py --server hypercorn",
    "gateway": "the keeper",
}


# ---- the two processes ----------------------------------------------------------------------


class LogLines:
    """A process's stdout, read as it comes, so the keeper's readiness is awaited, never polled.

    The keeper's lines are JSON; the simulator's (only warnings and worse, as procs.py's
    script configures it) are console text, kept as ``unparsed`` warnings. Reading also keeps the
    pipe drained (a full pipe would block the keeper's loop), and every
    warning or error is kept for the report: a benchmark that hides a ``session.lost`` or an
    unexpected ``gateway.client_disconnected`` measures something else than it claims.
    """

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = {"event": "unparsed", "level": "warning", "text": raw.decode()[:200]}
                self.lines.append(line if isinstance(line, dict) else {"event": str(line)})
            self._changed.set()
            self._changed = trio.Event()

    async def first(self, event: str) -> dict[str, Any]:
        """The first line logging ``event``, waiting for it if need be."""
        while True:
            for line in self.lines:
                if line.get("event") == event:
                    return line
            await self._changed.wait()

    def complaints(self) -> list[dict[str, Any]]:
        """Lines at warning or above, and local links the keeper ended itself.

        Our clients always close first, so any other ``reason`` is a surprise. (The ``code`` of
        a client's close is not checked: hypercorn hands the app 1006 even for a clean 1000.)
        """
        return [
            line
            for line in self.lines
            if line.get("level") in ("warning", "error", "critical")
            or (
                line.get("event") == "gateway.client_disconnected"
                and line.get("reason") != "client_closed"
            )
        ]


@dataclass
class Relay:
    process: trio.Process
    url: str
    log: LogLines


@dataclass
class Processes:
    sim: trio.Process
    keeper: trio.Process
    sim_url: str
    gateway_url: str
    log: LogLines
    sim_log: LogLines
    relays: dict[str, Relay]  # path name -> its bare relay

    def route(self, path: str) -> tuple[str, dict[str, str]]:
        """The URL of ``path`` and the credentials a client authenticates there with."""
        if path == "direct":
            return self.sim_url, SIM_ACCOUNT
        if path == "gateway":
            return self.gateway_url, LOCAL_CLIENT
        return self.relays[path].url, SIM_ACCOUNT  # a bare relay passes auth straight through

    def pid(self, path: str) -> int | None:
        """The relay process ``path`` goes through, if it is a bare relay's."""
        relay = self.relays.get(path)
        return None if relay is None else relay.process.pid


def keeper_config(sim_port: int) -> str:
    """One account on the simulator, with a gateway on any free port (read back from the log)."""
    return "\n".join(
        [
            "log: {level: info, format: json}",
            "accounts:",
            "  - name: a0",
            "    client_id: id0",
            "    client_secret: secret0",
            f"    url: ws://127.0.0.1:{sim_port}/ws/api/v2",
            "    gateway:",
            "      listen: 127.0.0.1:0",
            "      clients:",
            f"        - {{client_id: {LOCAL_CLIENT['client_id']}, "
            f"client_secret: {LOCAL_CLIENT['client_secret']}}}",
            "",
        ]
    )


async def stop(process: trio.Process) -> None:
    """SIGTERM, as systemd stops the keeper (and as cProfile needs, to write its file)."""
    with trio.CancelScope(shield=True):
        process.terminate()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
            return
        process.kill()
        await process.wait()


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError(f"the simulator ended before printing its port ({line!r})")
        line += chunk
    return line


def place(process: trio.Process, core: int | None) -> None:
    """Pin ``process`` to ``core`` (None: leave it where the OS puts it)."""
    if core is not None:
        pin(process.pid, core)


async def start_relay(
    nursery: trio.Nursery, stack: AsyncExitStack, server: str, upstream: str, core: int | None
) -> Relay:
    """A bare relay process to ``upstream``; its first line is its port, later lines complaints
    (stderr with them: hypercorn's error log, or a traceback)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(BARE_RELAY), "--upstream", upstream, "--server", server],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stack.push_async_callback(stop, process)
    place(process, core)
    assert process.stdout is not None
    with trio.fail_after(STARTUP_TIMEOUT_S):
        port = int(await read_line(process.stdout))
    log = LogLines()
    nursery.start_soon(log.pump, process.stdout)
    return Relay(process, f"ws://127.0.0.1:{port}/ws/api/v2", log)


@asynccontextmanager
async def processes(profile: Path | None, pinned: bool) -> AsyncIterator[Processes]:
    """The simulator, the two bare relays, then the keeper, each its own process; all stopped
    on the way out. ``pinned``: the simulator and this process on the load core, the keeper
    and the relays on the measured one (procs.cores())."""
    python = [sys.executable]
    load_core, measured_core = cores() if pinned else (None, None)
    if load_core is not None:
        pin(0, load_core)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        sim = await trio.lowlevel.open_process(
            [*python, "-c", SIMULATOR, "1"], stdout=subprocess.PIPE
        )
        stack.push_async_callback(stop, sim)
        place(sim, load_core)
        assert sim.stdout is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            sim_port = int(await read_line(sim.stdout))
        sim_log = LogLines()  # only its warnings, as console lines: kept for the report
        nursery.start_soon(sim_log.pump, sim.stdout)
        sim_url = f"ws://127.0.0.1:{sim_port}/ws/api/v2"
        relays = {
            path: await start_relay(nursery, stack, server, sim_url, measured_core)
            for path, server in (("bare", "trio-websocket"), ("bare-hc", "hypercorn"))
        }

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config = tmp / "keeper.yaml"
        config.write_text(keeper_config(sim_port))
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile)]
        keeper = await trio.lowlevel.open_process(
            [*python, "-m", "deribit_keeper", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
        )
        stack.push_async_callback(stop, keeper)
        place(keeper, measured_core)
        assert keeper.stdout is not None
        log = LogLines()
        nursery.start_soon(log.pump, keeper.stdout)
        try:
            with trio.fail_after(STARTUP_TIMEOUT_S):
                listening = await log.first("gateway.listening")
                await log.first("session.ready")
        except trio.TooSlowError:
            raise RuntimeError(f"the keeper was not ready in {STARTUP_TIMEOUT_S:g} s") from None
        yield Processes(
            sim=sim,
            keeper=keeper,
            sim_url=sim_url,
            gateway_url=f"ws://127.0.0.1:{listening['port']}/ws/api/v2",
            log=log,
            sim_log=sim_log,
            relays=relays,
        )


# ---- a JSON-RPC client, as an engine's ----------------------------------------------------


class Client:
    """A plain Deribit client over one WebSocket: integer ids, answers matched by id."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, params: dict[str, Any]) -> int:
        request_id = next(self._ids)
        frame = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        await self._ws.send_message(json.dumps(frame))
        return request_id

    async def answer(self) -> dict[str, Any]:
        """The next answer; notifications (none are asked for) are skipped."""
        while True:
            message = json.loads(await self._ws.get_message())
            if isinstance(message, dict) and "id" in message:
                return message

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = await self.send(method, params)
        while True:
            answer = await self.answer()
            if answer["id"] == request_id:
                return answer


@asynccontextmanager
async def client(url: str, credentials: dict[str, str]) -> AsyncIterator[Client]:
    """An authenticated client, closed cleanly (1000) on the way out."""
    async with open_websocket_url(url) as ws:
        rpc = Client(ws)
        answer = await rpc.call("public/auth", credentials)
        if "result" not in answer:
            raise RuntimeError(f"public/auth at {url} refused: {answer.get('error')}")
        yield rpc


@asynccontextmanager
async def clients(url: str, credentials: dict[str, str], n: int) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(client(url, credentials)) for _ in range(n)]


# ---- round-trip latency -------------------------------------------------------------------


@dataclass
class Series:
    micros: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)  # Deribit error code -> count

    def pct(self, p: float) -> float:
        """The nearest-rank percentile: a value that was actually measured."""
        ordered = sorted(self.micros)
        return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


async def timed(rpc: Client, series: Series | None) -> None:
    started = time.perf_counter_ns()
    answer = await rpc.call(METHOD, dict(PARAMS))
    elapsed = (time.perf_counter_ns() - started) / 1000
    if series is None:
        return
    series.micros.append(elapsed)
    if "error" in answer:
        code = int(answer["error"].get("code", 0))
        series.errors[code] = series.errors.get(code, 0) + 1


async def round_trips(procs: Processes, requests: int, warmup: int) -> dict[str, Series]:
    """One request on every path per round, in turn, in an order shuffled each round (seeded,
    so runs compare), so slow moments of the machine fall on every series alike and no path
    always follows the same other one."""
    series = {path: Series() for path in PATHS}
    order = random.Random(0)
    async with AsyncExitStack() as stack:
        rpcs = {path: await stack.enter_async_context(client(*procs.route(path))) for path in PATHS}
        turn = list(PATHS)
        for i in range(warmup + requests):
            keep = i >= warmup
            order.shuffle(turn)
            for path in turn:
                await timed(rpcs[path], series[path] if keep else None)
    return series


# ---- sustained throughput -----------------------------------------------------------------


@dataclass
class Load:
    answered: int = 0  # answers that arrived inside the measured window
    errors: int = 0
    stalled: int = 0  # answers still missing DRAIN_TIMEOUT_S after the run
    cpu: dict[str, float] = field(default_factory=dict)  # process -> % of one core


async def drive(rpc: Client, window: int, start: float, end: float, load: Load) -> None:
    """Keep ``window`` requests in flight on one link until ``end``, then wait for the rest."""
    slots = trio.Semaphore(window)

    async def read() -> None:
        while True:
            answer = await rpc.answer()
            slots.release()
            if start <= trio.current_time() < end:
                load.answered += 1
                load.errors += "error" in answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        while trio.current_time() < end:
            await slots.acquire()
            await rpc.send(METHOD, dict(PARAMS))
        settled = 0
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            while settled < window:
                await slots.acquire()
                settled += 1
        load.stalled += window - settled
        nursery.cancel_scope.cancel()


async def throughput(procs: Processes, path: str, links: int, window: int, seconds: float) -> Load:
    load = Load()
    pids = {"keeper": procs.keeper.pid, "sim": procs.sim.pid}
    relay = procs.pid(path)
    if relay is not None:
        pids["relay"] = relay
    async with clients(*procs.route(path), links) as rpcs:
        start = trio.current_time() + LOAD_WARMUP_S
        end = start + seconds
        async with trio.open_nursery() as nursery:
            for rpc in rpcs:
                nursery.start_soon(drive, rpc, window, start, end, load)
            await trio.sleep_until(start)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            before["bench"] = time.process_time()
            await trio.sleep_until(end)
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            after["bench"] = time.process_time()
    load.cpu = {name: 100 * (after[name] - before[name]) / seconds for name in after}
    return load


# ---- the report ---------------------------------------------------------------------------


def verdict(added: float, target: float) -> str:
    return f"{'PASS' if added <= target else 'OVER'} (target <= {target:g})"


def latency_table(series: dict[str, Series], requests: int, warmup: int) -> list[str]:
    rows = [
        f"round trip: {METHOD} {json.dumps(PARAMS)}, {requests} each after {warmup} warm-up,"
        f" {', '.join(PATHS)} in turn (shuffled each round)",
        f"  {'us':<9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}  {'errors':<8}path",
    ]
    for name, one in series.items():
        cells = "".join(f"{one.pct(p):8.0f}" for p in (50, 90, 99))
        errors = sum(one.errors.values())
        shown = f"{errors} {dict(sorted(one.errors.items()))}" if errors else "0"
        rows.append(f"  {name:<9}{cells}{max(one.micros):9.0f}  {shown:<8}{PATHS[name]}")
    if any(one.errors for one in series.values()):
        rows.append("  (errors are timed too: e.g. -32601, a simulator without the method)")
    rows.append("  (both bare relays copy frames unparsed over one trio-websocket client each)")

    def added(path: str, base: str, p: float) -> float:
        return series[path].pct(p) - series[base].pct(p)

    for label, path, base in (
        ("added by a bare trio-websocket hop", "bare", "direct"),
        ("added by a bare hypercorn hop", "bare-hc", "direct"),
        ("hypercorn's server instead of trio-websocket's", "bare-hc", "bare"),
        ("added by the gateway beyond a bare hop", "gateway", "bare"),
        ("added by the gateway beyond a bare hypercorn hop", "gateway", "bare-hc"),
    ):
        rows.append(
            f"  {label + f' ({path} - {base})':<70} p50 {added(path, base, 50):+5.0f} us,"
            f" p99 {added(path, base, 99):+5.0f} us"
        )
    p50 = added("gateway", "direct", 50)
    p99 = added("gateway", "direct", 99)
    rows.append("  the gateway against the issue's targets (gateway - direct):")
    rows.append(f"  added   p50 {p50:+.0f} us {verdict(p50, TARGET_P50_US)}")
    rows.append(f"          p99 {p99:+.0f} us {verdict(p99, TARGET_P99_US)}")
    return rows


def load_table(loads: dict[tuple[str, int], Load], window: int, seconds: float) -> list[str]:
    rows = [
        f"throughput: one account, {window} requests in flight per link, {seconds:g} s each",
        f"  {'links':<7}{'path':<9}{'req/s':>9}{'errors':>8}{'stalled':>9}"
        f"{'keeper%':>9}{'relay%':>8}{'sim%':>7}{'bench%':>8}",
    ]
    for (path, links), load in loads.items():
        cpu = load.cpu
        relay = f"{cpu['relay']:8.0f}" if "relay" in cpu else f"{'-':>8}"
        rows.append(
            f"  {links:<7}{path:<9}{load.answered / seconds:9.0f}{load.errors:8}{load.stalled:9}"
            f"{cpu['keeper']:9.0f}{relay}{cpu['sim']:7.0f}{cpu['bench']:8.0f}"
        )
    for links in sorted({links for _, links in loads}):
        direct = loads.get(("direct", links))
        if not direct or not direct.answered:
            continue
        shares = [
            f"{path} carries {loads[path, links].answered / direct.answered:.0%}"
            for path in PATHS
            if path != "direct" and (path, links) in loads
        ]
        rows.append(f"  {links} link(s), of direct: {', '.join(shares)}")
    rows.append("  (CPU in % of one core; the processes share this machine's cores)")
    return rows


def complaints_table(name: str, log: LogLines) -> list[str]:
    found = log.complaints()
    if not found:
        return [f"{name} log: no warnings, errors or unexpected link ends"]
    rows = [f"{name} log: {len(found)} warnings, errors or unexpected link ends:"]
    for line in found[:10]:
        rows.append("  " + json.dumps({k: v for k, v in line.items() if k != "timestamp"}))
    return rows


def profile_table(path: Path, top: int) -> list[str]:
    """The keeper's own time (tottime), heaviest first: where the relay spends its CPU."""
    stats = pstats.Stats(str(path))
    entries: Any = stats.stats  # type: ignore[attr-defined]  # pstats keeps this undocumented
    rows = [f"keeper profile ({path}), own time, top {top}:"]
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    total = sum(value[2] for value in entries.values()) or 1.0
    for (filename, line, name), (_, calls, own, cumulative, _) in ranked:
        where = f"{_short(filename)}:{line}({name})"
        rows.append(f"  {100 * own / total:5.1f}%  {calls:>9}  {cumulative:7.2f}s  {where}")
    return rows


def _short(filename: str) -> str:
    for marker in ("site-packages/", "daemon/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


@dataclass
class Measured:
    """One run's figures: the round trips per path, the throughput runs, the printed report."""

    series: dict[str, Series]
    loads: dict[tuple[str, int], Load]
    rows: list[str]

    def added_us(self, p: float) -> float:
        """What the gateway adds over going direct, at percentile ``p``, in µs."""
        return self.series["gateway"].pct(p) - self.series["direct"].pct(p)

    def gateway_rps(self) -> float:
        """The most relayed requests per second through the one account, over the link counts."""
        rates = [load.answered for (path, _), load in self.loads.items() if path == "gateway"]
        return max(rates, default=0) / self.seconds if self.seconds else 0.0

    seconds: float = 0.0


async def measure(args: argparse.Namespace) -> Measured:
    """Every path's round trips, then the throughput runs; the processes pinned if
    ``args.pin``."""
    async with processes(args.profile, args.pin) as procs:
        series = await round_trips(procs, args.requests, args.warmup)
        loads: dict[tuple[str, int], Load] = {}
        for links in args.links:
            # Two relays' links never follow each other: a bare relay's upstream connections
            # close after its clients', and the simulator holds one IP to 11 connections.
            for path in sorted(args.load_paths, key=["direct", "bare", "gateway", "bare-hc"].index):
                loads[path, links] = await throughput(procs, path, links, args.window, args.seconds)
        await trio.sleep(0.2)  # let the keeper log the last links' ends
        load_1m = os.getloadavg()[0]
        rows = [
            f"{os.cpu_count()} cores, load average {load_1m:.2f} at the end (other work skews"
            " both paths; the difference is what counts)",
            *latency_table(series, args.requests, args.warmup),
            "",
            *load_table(loads, args.window, args.seconds),
            "",
            *complaints_table("keeper", procs.log),
            *complaints_table("simulator", procs.sim_log),
            *[
                row
                for path, relay in procs.relays.items()
                for row in complaints_table(f"{path} relay", relay.log)
            ],
        ]
        return Measured(series, loads, rows, seconds=args.seconds)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="timed round trips per path")
    parser.add_argument("--warmup", type=int, default=500, help="untimed round trips first")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--window", type=int, default=16, help="requests in flight per link")
    parser.add_argument(
        "--links", type=int, nargs="+", default=[1, 8], help="local links per throughput run"
    )
    parser.add_argument(
        "--load-paths",
        nargs="+",
        choices=list(PATHS),
        default=["direct", "bare", "gateway"],
        help="paths of the throughput runs (bare-hc adds 2 runs' time)",
    )
    parser.add_argument(
        "--profile", type=Path, help="run the keeper under cProfile, writing this file"
    )
    parser.add_argument("--top", type=int, default=25, help="profile rows to print")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the simulator and this process on one core, the rest on the other",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    try:
        rows = trio.run(measure, args).rows
    except RuntimeError as error:
        print(f"gateway_roundtrip: {error}", file=sys.stderr)
        return 1
    if args.profile is not None:
        rows += ["", *profile_table(args.profile, args.top)]
    rows.append(f"({time.monotonic() - started:.0f} s in all)")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
