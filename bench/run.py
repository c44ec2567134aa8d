"""``make bench``: every figure of the performance issue, side by side in one run, into RESULTS.md.

The keeper must cost almost nothing beyond trio-websocket, so its figures are measured beside
the floor (bare trio-websocket clients, floor.py) in the same run, against the same lean load
simulator (load_sim.py), on the same core: memory and CPU become ratios, not numbers from
another day. The simulator is pinned to one core, the keeper or the floor to the other
(procs.py), and the simulator's own CPU share is reported for every phase, so that it is seen
never to be the bottleneck. Latencies are stamped on the simulator's side, from just before it
sends a test_request to the kernel's receive timestamp of the answer.

One run, for each N (default 1, 100, 1000), the floor and then the keeper, each with a fresh
simulator: start until all N are ready; settle; an idle window with heartbeats spread evenly
(CPU, RSS at its end, answer latencies). At the largest N, then: every heartbeat bunched into
the same instant for a few intervals (the burst); for the keeper, links falling silent right
after a test_request and right after the answer to public/test (dead-link detection); and the
simulator resetting every link (until all ready again, and how the auth attempts spread). Then,
at the largest N, the floor and the keeper side by side: both at once on the measured core, each
against a simulator of its own, their idle CPU over one window, which is what the CPU figures
compare (this VM's speed drifts by a fifth from one minute to the next, and the two sides
measured one after the other drifted with it; in one window the drift cancels out of their
ratio). Then the gateway figures (gateway_roundtrip.py, pinned). ``--runs`` repeats it all;
each figure is reported as the median with the spread of the runs.

Then, unless ``--no-profile``, the profile: py-spy (if installed) on the keeper at the largest
N at start, idle, under the burst and through a reset, and tracemalloc snapshots of the keeper
and the floor at 1 and N sessions, so that RESULTS.md says where memory per session and CPU go.
The analysis written by hand in RESULTS.md (between the ANALYSIS markers) is kept across runs.

A measurement, not a test: it exits 0 whatever the figures (1 only if it cannot run).

    python bench/run.py                 # the full run: N = 1, 100, 1000; 3 runs; the profile
    python bench/run.py --quick         # N up to 100, 1 run, short windows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import gateway_roundtrip
import profiles
import trio
from procs import cores, cpu_seconds, pin, rss_kib

BENCH: Final = Path(__file__).resolve().parent
RESULTS: Final = BENCH / "RESULTS.md"
ANALYSIS_START: Final = "<!-- ANALYSIS: written by hand, kept by run.py -->"
ANALYSIS_END: Final = "<!-- /ANALYSIS -->"
SETTLE_S: Final = 3.0  # after all are ready: let the setup's garbage and stragglers settle
READY_TIMEOUT_S: Final = 120.0
# The targets.
MEMORY_ABOVE_FLOOR_KIB: Final = 6.0
CPU_RATIO: Final = 1.05
STEADY_P99_MS: Final = 1.0
BURST_P99_MS: Final = 100.0
STARTUP_S: Final = 0.8
RESET_S: Final = 1.5
AUTH_SHARE_1S: Final = 0.60
DEAD_LINK_INTERVALS: Final = 1.2
GATEWAY_P50_US: Final = 150.0
GATEWAY_P99_US: Final = 1000.0
GATEWAY_RPS: Final = 5000.0
SILENCE_WHERE: Final = ("after_test_request", "after_test_answer")
SIDES: Final = ("floor", "keeper")


# ---- the processes ----------------------------------------------------------------------


class Sim:
    """load_sim.py in its own process on the load core, commanded over its stdin."""

    def __init__(self, accounts: int, core: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "load_sim.py"), "--accounts", str(accounts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        pin(self.process.pid, core)
        self.port = int(self._read()["port"])
        self.url = f"ws://127.0.0.1:{self.port}/ws/api/v2"

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load simulator ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def cmd(self, cmd: str, **params: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            self.cmd_nowait("stop")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()

    def cmd_nowait(self, cmd: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.process.stdin.flush()


def keeper_config(
    directory: Path,
    url: str,
    accounts: int,
    interval: int,
    request_timeout: float = 5.0,
    cod_check_interval: int = 60,
) -> Path:
    """N accounts, every default as an operator gets it (signature auth, COD checks every 60 s);
    only a traced keeper, slowed by tracemalloc, gets a longer ``request_timeout``, and
    ``--cod-check-interval`` shows what the checks cost."""
    lines = [
        "log: {level: warning, format: json}",
        f"defaults: {{url: '{url}', heartbeat_interval: {interval}, "
        f"request_timeout: {request_timeout:g}, cod_check_interval: {cod_check_interval}}}",
        "accounts:",
        *(
            f"  - {{name: a{i}, client_id: id{i}, client_secret: secret{i}}}"
            for i in range(accounts)
        ),
    ]
    path = directory / "keeper.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def client_command(
    side: str,
    sim: Sim,
    accounts: int,
    interval: int,
    tmp: Path,
    request_timeout: float = 5.0,
    cod_check_interval: int = 60,
) -> list[str]:
    """The measured process's arguments after the interpreter: the keeper, or the floor."""
    if side == "keeper":
        config = keeper_config(
            tmp, sim.url, accounts, interval, request_timeout, cod_check_interval
        )
        return ["-m", "deribit_keeper", "run", "--config", str(config)]
    return [
        str(BENCH / "floor.py"),
        *("--url", sim.url, "--connections", str(accounts), "--interval", str(interval)),
    ]


def start_client(command: list[str], core: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
    pin(process.pid, core)
    return process


def stop_client(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def cpu_window(pids: dict[str, int], into: dict[str, float]) -> Iterator[None]:
    """CPU of each process over the block, in % of one core, into ``into``."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    for name, pid in pids.items():
        into[name] = 100 * (cpu_seconds(pid) - before[name]) / elapsed


# ---- one side, one N --------------------------------------------------------------------


@dataclass
class Side:
    """What one measured process showed at one N."""

    side: str
    accounts: int
    startup_s: float = 0.0
    rss_kib: int = 0
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process -> %
    steady_us: list[float] = field(default_factory=list)
    burst_us: list[float] = field(default_factory=list)
    burst_send_s: list[float] = field(default_factory=list)
    reset_s: float | None = None
    auth_share_1s: float | None = None
    auth_span_s: float | None = None
    dead_link_s: dict[str, list[float]] = field(default_factory=dict)
    complaints: dict[str, int] = field(default_factory=dict)  # logged event -> count


def measure_side(side: str, accounts: int, settings: Settings, *, largest: bool) -> Side:
    """One fresh simulator and one measured process through the phases for this N."""
    load_core, measured_core = cores()
    result = Side(side, accounts)
    sim = Sim(accounts, load_core)
    try:
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w+b") as log:
            command = client_command(
                side,
                sim,
                accounts,
                settings.interval,
                Path(tmp),
                cod_check_interval=settings.cod_check_interval,
            )
            client = start_client(command, measured_core, log)
            try:
                pids = {"measured": client.pid, "sim": sim.process.pid}
                run_phases(result, sim, pids, settings, largest=largest)
            finally:
                stop_client(client)
            log.seek(0)
            result.complaints = complaints(log.read())
    finally:
        sim.stop()
    return result


def measure_together(accounts: int, settings: Settings) -> dict[str, dict[str, float]]:
    """Idle CPU of the floor and the keeper over one window, both running at once on the
    measured core, each against a simulator of its own on the load core: per side, the
    measured process's % and its simulator's."""
    load_core, measured_core = cores()
    sims: dict[str, Sim] = {}
    clients: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "wb") as log:
        try:
            for side in SIDES:
                sims[side] = sim = Sim(accounts, load_core)
                home = Path(tmp) / side
                home.mkdir()
                command = client_command(
                    side, sim, accounts, settings.interval, home,
                    cod_check_interval=settings.cod_check_interval,
                )  # fmt: skip
                clients[side] = start_client(command, measured_core, log)
            for side, sim in sims.items():
                if not sim.cmd("wait_ready", n=accounts, timeout=READY_TIMEOUT_S)["ok"]:
                    raise RuntimeError(f"{side}, side by side: not all {accounts} ready")
            time.sleep(SETTLE_S)
            pids = {side: client.pid for side, client in clients.items()}
            pids |= {f"{side} sim": sim.process.pid for side, sim in sims.items()}
            cpu: dict[str, float] = {}
            with cpu_window(pids, cpu):
                time.sleep(settings.idle_s)
        finally:
            for client in clients.values():
                stop_client(client)
            for sim in sims.values():
                sim.stop()
    return {side: {"measured": cpu[side], "sim": cpu[f"{side} sim"]} for side in SIDES}


def run_phases(
    result: Side, sim: Sim, pids: dict[str, int], settings: Settings, *, largest: bool
) -> None:
    n, interval = result.accounts, settings.interval
    cpu = result.cpu
    cpu["startup"] = {}
    with cpu_window(pids, cpu["startup"]):
        ready = sim.cmd("wait_ready", n=n, timeout=READY_TIMEOUT_S)
    if not ready["ok"]:
        raise RuntimeError(f"{result.side}: only {ready['ready']} of {n} ready")
    result.startup_s = float(ready["since_first"])
    time.sleep(SETTLE_S)
    sim.cmd("latencies", clear=True)
    cpu["idle"] = {}
    with cpu_window(pids, cpu["idle"]):
        time.sleep(settings.idle_s if largest else settings.short_idle_s)
    result.rss_kib = rss_kib(pids["measured"])
    result.steady_us = sim.cmd("latencies", clear=True)["micros"].get("spread", [])
    if not largest:
        return
    tick_in = float(sim.cmd("phase", mode="bunched")["tick_in"] or 0.0)
    cpu["burst"] = {}
    with cpu_window(pids, cpu["burst"]):
        time.sleep(tick_in + (settings.burst_ticks - 1) * interval + 1.0)
    result.burst_us = sim.cmd("latencies", clear=True)["micros"].get("bunched", [])
    result.burst_send_s = sim.cmd("bursts")["seconds"]
    sim.cmd("phase", mode="spread")
    if result.side != "keeper":
        return  # bare clients neither notice silence nor reconnect: nothing more to measure
    cpu["dead link"] = {}
    with cpu_window(pids, cpu["dead link"]):
        silence = sim.cmd(
            "silence", where=list(SILENCE_WHERE), count=settings.silent_links,
            timeout=4 * interval + 10,
        )  # fmt: skip
    result.dead_link_s = silence["seconds"]
    if not sim.cmd("wait_ready", n=n, timeout=READY_TIMEOUT_S)["ok"]:
        raise RuntimeError("keeper: the silenced links did not come back")
    time.sleep(SETTLE_S)
    cpu["reset"] = {}
    with cpu_window(pids, cpu["reset"]):
        reset_ns = int(sim.cmd("reset_all")["reset_ns"])
        again = sim.cmd("wait_ready", n=n, timeout=READY_TIMEOUT_S)
    if not again["ok"]:
        raise RuntimeError(f"keeper: only {again['ready']} of {n} ready after the reset")
    result.reset_s = float(again["since_reset"])
    auths = sorted(sim.cmd("auths", since_ns=reset_ns)["seconds"])
    result.auth_share_1s = busiest_second(auths)
    result.auth_span_s = auths[-1] - auths[0] if auths else None


def busiest_second(times: Sequence[float]) -> float:
    """The largest share of ``times`` (sorted) inside any window of one second."""
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best / len(times) if times else 0.0


def complaints(log: bytes) -> dict[str, int]:
    """Logged events at warning and above, by name: what the keeper said went wrong."""
    counts: dict[str, int] = {}
    for raw in log.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            key = "(not JSON) " + raw.decode(errors="replace")[:80]
        else:
            if not isinstance(line, dict) or line.get("level") not in ("warning", "error"):
                continue
            key = f"{line.get('event')} ({line.get('level')})"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- a whole run --------------------------------------------------------------------------


@dataclass
class Settings:
    accounts: list[int]
    runs: int
    interval: int
    idle_s: float
    short_idle_s: float
    burst_ticks: int
    silent_links: int
    gateway_requests: int
    gateway_seconds: float
    profile: bool
    quick: bool
    cod_check_interval: int = 60


@dataclass
class Run:
    sides: dict[tuple[str, int], Side]
    together: dict[str, dict[str, float]]  # side by side at the largest N: side -> process -> %
    gateway: gateway_roundtrip.Measured


def one_run(settings: Settings, number: int) -> Run:
    sides: dict[tuple[str, int], Side] = {}
    largest = max(settings.accounts)
    for n in sorted(settings.accounts):
        for side in SIDES:
            say(f"run {number}: {side}, {n} sessions")
            sides[side, n] = measure_side(side, n, settings, largest=n == largest)
    say(f"run {number}: floor and keeper side by side, {largest} sessions each")
    together = measure_together(largest, settings)
    say(f"run {number}: gateway")
    args = gateway_roundtrip.parse(
        [
            *("--requests", str(settings.gateway_requests)),
            *("--warmup", str(max(100, settings.gateway_requests // 10))),
            *("--seconds", str(settings.gateway_seconds)),
            "--pin",
        ]
    )
    return Run(sides, together, trio.run(gateway_roundtrip.measure, args))


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---- figures ------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was measured."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = -int(-len(ordered) * p // 100)  # ceil(len * p / 100)
    return ordered[max(0, min(len(ordered) - 1, rank - 1))]


@dataclass
class Figure:
    name: str
    keeper: list[float]  # one value per run
    floor: list[float] | None
    target: Callable[[float], float]  # from the floor's median (or ignored): the bound
    unit: str
    target_text: str
    higher_is_better: bool = False
    digits: int = 1

    def verdict(self) -> tuple[float, float, float, bool]:
        """(keeper median, bound, figure / bound, pass)."""
        value = statistics.median(self.keeper)
        floor = statistics.median(self.floor) if self.floor else 0.0
        bound = self.target(floor)
        ratio = value / bound if bound else float("inf")
        passed = value >= bound if self.higher_is_better else value <= bound
        return value, bound, ratio, passed

    def spread(self, values: list[float] | None) -> str:
        if not values:
            return "-"
        f = f"{{:.{self.digits}f}}"
        middle = f.format(statistics.median(values))
        if len(values) == 1:
            return f"{middle} {self.unit}"
        return f"{middle} {self.unit} ({f.format(min(values))}-{f.format(max(values))})"


def figures(runs: list[Run], settings: Settings) -> list[Figure]:
    big = max(settings.accounts)
    small = min(settings.accounts)
    interval = settings.interval

    def each(side: str, n: int, get: Callable[[Side], float | None]) -> list[float]:
        values = [get(run.sides[side, n]) for run in runs]
        return [v for v in values if v is not None]

    def slope(side: str) -> list[float]:
        return [
            (run.sides[side, big].rss_kib - run.sides[side, small].rss_kib) / max(big - small, 1)
            for run in runs
        ]

    def idle_cpu(side: str) -> list[float]:
        return [run.together[side]["measured"] for run in runs]

    pairs = zip(idle_cpu("keeper"), idle_cpu("floor"), strict=True)
    cpu_ratio = [k / f if f else float("inf") for k, f in pairs]
    dead = {
        where: each("keeper", big, lambda s, w=where: max(s.dead_link_s.get(w, [float("nan")])))  # type: ignore[misc]
        for where in SILENCE_WHERE
    }
    return [
        Figure(
            f"memory per session (RSS slope {small} → {big})", slope("keeper"), slope("floor"),
            lambda floor: floor + MEMORY_ABOVE_FLOOR_KIB, "KiB", "≤ floor + 6 KiB",
        ),
        Figure(
            f"idle CPU at {big} sessions side by side, x the floor", cpu_ratio, [1.0] * len(runs),
            lambda _: CPU_RATIO, "x", "≤ 1.05x the floor", digits=3,
        ),
        Figure(
            f"idle CPU at {big} sessions side by side, % of one core",
            idle_cpu("keeper"), idle_cpu("floor"),
            lambda floor: floor * CPU_RATIO, "%", "≤ 1.05x the floor", digits=2,
        ),
        Figure(
            "test_request answer latency p99, steady",
            each("keeper", big, lambda s: pct(s.steady_us, 99) / 1000),
            each("floor", big, lambda s: pct(s.steady_us, 99) / 1000),
            lambda _: STEADY_P99_MS, "ms", "≤ 1.0 ms", digits=3,
        ),
        Figure(
            f"all {big} test_requests at once: answer p99",
            each("keeper", big, lambda s: pct(s.burst_us, 99) / 1000),
            each("floor", big, lambda s: pct(s.burst_us, 99) / 1000),
            lambda _: BURST_P99_MS, "ms", "≤ 100 ms",
        ),
        Figure(
            f"first TCP connection until all {big} ready",
            each("keeper", big, lambda s: s.startup_s), each("floor", big, lambda s: s.startup_s),
            lambda _: STARTUP_S, "s", "≤ 0.8 s", digits=2,
        ),
        Figure(
            f"all {big} links reset: until all ready again",
            each("keeper", big, lambda s: s.reset_s), None, lambda _: RESET_S, "s", "≤ 1.5 s",
            digits=2,
        ),
        Figure(
            "reset: auth attempts in the busiest 1 s window",
            [100 * v for v in each("keeper", big, lambda s: s.auth_share_1s)],
            None, lambda _: 100 * AUTH_SHARE_1S, "%", "≤ 60%", digits=0,
        ),
        *(
            Figure(
                f"dead link, silence {where.replace('_', ' ')}: worst detection",
                dead[where], None, lambda _: DEAD_LINK_INTERVALS * interval, "s",
                f"≤ 1.2 x interval ({DEAD_LINK_INTERVALS * interval:g} s)", digits=3,
            )
            for where in SILENCE_WHERE
        ),
        Figure(
            "gateway: added at p50 (gateway - direct)",
            [run.gateway.added_us(50) for run in runs], None, lambda _: GATEWAY_P50_US, "µs",
            "≤ 150 µs", digits=0,
        ),
        Figure(
            "gateway: added at p99 (gateway - direct)",
            [run.gateway.added_us(99) for run in runs], None, lambda _: GATEWAY_P99_US, "µs",
            "≤ 1,000 µs", digits=0,
        ),
        Figure(
            "gateway: relayed requests/s through one account",
            [run.gateway.gateway_rps() for run in runs], None, lambda _: GATEWAY_RPS, "req/s",
            "≥ 5,000 req/s", higher_is_better=True, digits=0,
        ),
    ]  # fmt: skip


# ---- the report ---------------------------------------------------------------------------


def machine() -> list[str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import trio_websocket

    return [
        f"- machine: {platform.node()}, {os.cpu_count()} cores ({model}), "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"trio {trio.__version__}, trio-websocket {trio_websocket.__version__}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {commit()}",
    ]


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=BENCH, capture_output=True, text=True)
        return done.stdout.strip()

    # RESULTS.md itself is rewritten twice in a run (before the profile and after), so it is
    # no sign that the code measured differs from the commit.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!RESULTS.md")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")


def report(runs: list[Run], settings: Settings, profile_rows: list[str], old: str) -> str:
    load_core, measured_core = cores()
    big = max(settings.accounts)
    rows = [
        "# Benchmark results (`make bench`)",
        "",
        "Written by `bench/run.py`; the analysis section is written by hand and kept across runs.",
        "",
        *machine(),
        f"- settings: N = {', '.join(map(str, settings.accounts))}; {settings.runs} run(s); "
        f"heartbeat {settings.interval} s; the keeper's COD checks every "
        f"{settings.cod_check_interval} s; idle window {settings.idle_s:g} s at N = {big} "
        f"({settings.short_idle_s:g} s below); burst {settings.burst_ticks} bunched ticks; "
        f"{settings.silent_links} silenced links per starting point; gateway "
        f"{settings.gateway_requests} round trips per path, {settings.gateway_seconds:g} s "
        f"per throughput run{'; --quick' if settings.quick else ''}",
        f"- cores: the load simulator (and the gateway's engine client and real simulator) on "
        f"core {load_core}; the keeper, the floor and the bare relays on core {measured_core}",
        "- stamping: load_sim.py, test_request send (just before send()) to the kernel's "
        "receive timestamp (SO_TIMESTAMPNS) of the answering public/test; ready = "
        "public/set_heartbeat answered; phases spread evenly over the interval",
        "- each figure: the median of the runs, (min-max) over them; pass or miss on the median",
        "",
        "| figure | keeper | floor (bare trio-websocket) | target | keeper ÷ target | result |",
        "|---|---|---|---|---|---|",
    ]
    for figure in figures(runs, settings):
        _, bound, ratio, passed = figure.verdict()
        target = figure.target_text
        if "floor" in target and figure.floor:
            target += f" = {bound:.{figure.digits}f} {figure.unit}"
        rows.append(
            f"| {figure.name} | {figure.spread(figure.keeper)} | {figure.spread(figure.floor)} "
            f"| {target} | {ratio:.2f} | {'**pass**' if passed else '**MISS**'} |"
        )
    rows += ["", *details(runs, settings), "", *profile_rows, "", analysis(old)]
    return "\n".join(rows) + "\n"


def details(runs: list[Run], settings: Settings) -> list[str]:
    big = max(settings.accounts)
    rows = ["## Details per run", ""]
    rows.append("| run | side | N | ready after | RSS | idle CPU | p50 / p99 steady | p99 burst |")
    rows.append("|---|---|---|---|---|---|---|---|")
    for number, run in enumerate(runs, 1):
        for (side, n), s in sorted(run.sides.items(), key=lambda item: (item[0][1], item[0][0])):
            burst = f"{pct(s.burst_us, 99) / 1000:.1f} ms" if s.burst_us else "-"
            steady = (
                f"{pct(s.steady_us, 50) / 1000:.3f} / {pct(s.steady_us, 99) / 1000:.3f} ms "
                f"({len(s.steady_us)})"
                if s.steady_us
                else "-"
            )
            rows.append(
                f"| {number} | {side} | {n} | {s.startup_s:.2f} s | {s.rss_kib} KiB "
                f"| {s.cpu['idle']['measured']:.2f}% | {steady} | {burst} |"
            )
    rows += [
        "",
        "The load simulator's own CPU, % of its core (never the bottleneck if well below 100),"
        f" and the measured process's, per phase at N = {big}:",
        "",
    ]
    rows.append("| run | side | phase | simulator | measured process |")
    rows.append("|---|---|---|---|---|")
    worst = 0.0
    for number, run in enumerate(runs, 1):
        for side in SIDES:
            for phase, cpu in run.sides[side, big].cpu.items():
                worst = max(worst, cpu["sim"])
                rows.append(
                    f"| {number} | {side} | {phase} | {cpu['sim']:.1f}% | {cpu['measured']:.1f}% |"
                )
    rows += ["", f"The simulator's busiest phase used {worst:.0f}% of its core.", ""]
    rows += [
        f"Idle CPU side by side at N = {big} (both at once on one core, one window; the CPU"
        " figures above): " + "; ".join(
            f"run {number}: floor {run.together['floor']['measured']:.2f}%, keeper "
            f"{run.together['keeper']['measured']:.2f}% (their simulators "
            f"{run.together['floor']['sim']:.1f}%, {run.together['keeper']['sim']:.1f}%)"
            for number, run in enumerate(runs, 1)
        ),
        "",
    ]  # fmt: skip
    for number, run in enumerate(runs, 1):
        keeper = run.sides["keeper", big]
        sends = ", ".join(f"{1000 * s:.1f}" for s in keeper.burst_send_s)
        dead = "; ".join(
            f"{where.replace('_', ' ')}: " + ", ".join(f"{v:.3f}" for v in sorted(values))
            for where, values in keeper.dead_link_s.items()
        )
        rows.append(
            f"- run {number}: bunched ticks took the simulator {sends} ms to send; dead-link "
            f"detections (s) {dead or 'none'}; after the reset the auths spanned "
            f"{keeper.auth_span_s or 0:.2f} s; keeper warnings: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(keeper.complaints.items())) or "none")
        )
    rows += ["", "### Gateway (bench/gateway_roundtrip.py), the last run", "", "```"]
    rows += runs[-1].gateway.rows
    rows.append("```")
    return rows


def analysis(old: str) -> str:
    if ANALYSIS_START in old and ANALYSIS_END in old:
        kept = old.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0]
        return ANALYSIS_START + kept + ANALYSIS_END
    return "\n".join(
        [ANALYSIS_START, "## What limits each figure", "", "(not written yet)", ANALYSIS_END]
    )


# ---- the command --------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 100, 1 run, short windows")
    parser.add_argument("--runs", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument("--accounts", type=int, nargs="+", help="the Ns (default 1 100 1000)")
    parser.add_argument("--interval", type=int, default=10, help="heartbeat, seconds")
    parser.add_argument("--idle", type=float, help="idle window at the largest N, seconds")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy and tracemalloc")
    parser.add_argument(
        "--cod-check-interval",
        type=int,
        default=60,
        help="seconds between the keeper's COD checks (60, the default an operator gets)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    accounts = args.accounts or ([1, 100] if quick else [1, 100, 1000])
    # A whole number of COD checks (every 60 s per session) in the full idle window, so that
    # the keeper's CPU is not flattered by a window that misses them.
    idle = args.idle or (20.0 if quick else 60.0)
    return Settings(
        accounts=sorted(set(accounts)),
        runs=args.runs or (1 if quick else 3),
        interval=args.interval,
        idle_s=idle,
        short_idle_s=min(idle, 10.0),
        burst_ticks=2 if quick else 3,
        silent_links=3 if quick else 5,
        gateway_requests=1000 if quick else 5000,
        gateway_seconds=2.0 if quick else 5.0,
        profile=not args.no_profile,
        quick=quick,
        cod_check_interval=args.cod_check_interval,
    ), args.output


def main(argv: Sequence[str] | None = None) -> int:
    settings, output = parse(argv)
    pin(0, cores()[0])  # this process mostly sleeps; it must not take the measured core
    started = time.monotonic()
    try:
        runs = [one_run(settings, number) for number in range(1, settings.runs + 1)]
    except RuntimeError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 1
    old = output.read_text() if output.exists() else ""
    # Written before the profile too, so that a profile that fails loses no figure.
    output.write_text(report(runs, settings, ["## Profile", "", "(not run)"], old))
    profile_rows: list[str] = []
    if settings.profile:
        try:
            profile_rows = profiles.profile(settings)
        except RuntimeError as error:
            profile_rows = ["## Profile", "", f"The profile failed: {error}"]
            say(f"profile failed: {error}")
    output.write_text(report(runs, settings, profile_rows, old))
    say(f"wrote {output} in {time.monotonic() - started:.0f} s")
    print(output.read_text())
    return 0


if __name__ == "__main__":
    if shutil.which("git") is None:
        print("run.py: git not found (the report names the commit)", file=sys.stderr)
    sys.exit(main())
