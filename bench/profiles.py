"""The profile behind RESULTS.md's analysis: where the keeper's CPU and memory per session go.

A figure that misses its target needs a reason, and the reason must come from measurement:

- py-spy samples the keeper (pinned as in the measured runs; py-spy itself on the load core,
  ``--nonblocking`` so that it never stops the keeper) through four phases at the largest N:
  start, idle heartbeats, the burst, and a reset of every link. Each phase is summed by the
  innermost frame (own time), by the package that frame is in, and by the innermost frame in
  the keeper's own code (what keeper code the time is spent under).
- tracemalloc (traced.py) snapshots the keeper and the floor at the smallest and the largest N
  once all are ready; the difference, divided by the sessions added, is the bytes per session
  each allocation site holds, attributed to the innermost line of the keeper's (or the
  floor's) own code and to the library that made the allocation.

Traced and sampled runs are never the measured ones: tracing inflates memory and time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Final

from procs import cores, pin

if TYPE_CHECKING:
    from run import Settings

BENCH: Final = Path(__file__).resolve().parent
TOP: Final = 12
SNAPSHOT_TIMEOUT_S: Final = 180.0


def find_pyspy() -> str | None:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile(settings: Settings) -> list[str]:
    """Both profiles, as Markdown lines for RESULTS.md."""
    big, small = max(settings.accounts), min(settings.accounts)
    rows = ["## Profile", ""]
    pyspy = find_pyspy()
    if pyspy is None:
        rows.append("py-spy is not installed (`pip install py-spy`): no CPU profile.")
    else:
        rows += sampled(pyspy, settings, big)
    rows += ["", *traced(settings, small, big)]
    return rows


# ---- py-spy -------------------------------------------------------------------------------


def record(pyspy: str, pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    load_core, _ = cores()
    command = [pyspy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250"]
    command += ["--nonblocking", "-f", "raw", "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pin(process.pid, load_core)
    return process


def sampled(pyspy: str, settings: Settings, big: int) -> list[str]:
    from run import SETTLE_S, Sim, client_command, say, start_client, stop_client

    say(f"profile: py-spy on the keeper, {big} sessions")
    load_core, measured_core = cores()
    sim = Sim(big, load_core)
    outs: dict[str, Path] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp_name, open(Path(tmp_name) / "log", "wb") as log:
            tmp = Path(tmp_name)
            keeper = start_client(
                client_command("keeper", sim, big, settings.interval, tmp), measured_core, log
            )
            try:
                outs = {
                    phase: tmp / f"{phase}.txt" for phase in ("start", "idle", "burst", "reset")
                }
                spy = record(pyspy, keeper.pid, outs["start"], 4)
                sim.cmd("wait_ready", n=big, timeout=120)
                spy.wait()
                time.sleep(SETTLE_S)
                record(pyspy, keeper.pid, outs["idle"], min(settings.idle_s, 20)).wait()
                tick_in = float(sim.cmd("phase", mode="bunched")["tick_in"] or 0)
                record(pyspy, keeper.pid, outs["burst"], tick_in + settings.interval + 1).wait()
                sim.cmd("phase", mode="spread")
                time.sleep(SETTLE_S)
                spy = record(pyspy, keeper.pid, outs["reset"], 5)
                time.sleep(0.5)  # py-spy attached
                sim.cmd("reset_all")
                sim.cmd("wait_ready", n=big, timeout=120)
                spy.wait()
                summaries = {phase: summarize(path) for phase, path in outs.items()}
            finally:
                stop_client(keeper)
    finally:
        sim.stop()
    rows = [
        f"### CPU: py-spy on the keeper at {big} sessions (250 Hz, own time of active samples)",
        "",
    ]
    for phase, summary in summaries.items():
        rows += [f"**{phase}**", "", *summary, ""]
    return rows


def summarize(path: Path) -> list[str]:
    """py-spy's raw (collapsed) stacks, summed three ways, as Markdown."""
    if not path.exists():
        return ["(py-spy wrote nothing: could it attach?)"]
    leaves: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    keeper: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        leaves[_function(leaf)] += count
        packages[_package(leaf)] += count
        # cli.py's frame is trio.run itself: under it alone is trio's loop or a library's task.
        ours = [f for f in frames if "deribit_keeper/" in f and "deribit_keeper/cli.py" not in f]
        keeper[ours[-1] if ours else "(no keeper frame: trio's loop, library tasks)"] += count
    if not total:
        return ["(no active samples)"]

    def table(title: str, counter: Counter[str]) -> list[str]:
        cells = [f"{100 * n / total:.0f}% {name}" for name, n in counter.most_common(TOP)]
        return [f"- {title}: " + "; ".join(cells)]

    return [
        f"- {total} samples",
        *table("by package (innermost frame)", packages),
        *table("by function (own time)", leaves),
        *table("under keeper code (innermost keeper frame)", keeper),
    ]


def _function(frame: str) -> str:
    """``func (path/file.py:12)`` without the line number."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _package(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    path = where.rsplit(":", 1)[0]
    if "deribit_keeper/" in path:
        return "deribit_keeper"
    first = path.split("/", 1)[0]
    return first.removesuffix(".py") or "?"


# ---- tracemalloc --------------------------------------------------------------------------


def traced(settings: Settings, small: int, big: int) -> list[str]:
    sizes: dict[tuple[str, int], tuple[Counter[str], Counter[str], int]] = {}
    for side in ("keeper", "floor"):
        for n in (small, big):
            sizes[side, n] = snapshot_sizes(side, n, settings)
    rows = [
        f"### Memory: tracemalloc, bytes per session added from {small} to {big} sessions",
        "",
        "Python allocations only (RSS also holds allocator slack and what C code allocates).",
        "",
    ]
    per = max(big - small, 1)
    for side in ("keeper", "floor"):
        lines_big, libs_big, total_big = sizes[side, big]
        lines_small, libs_small, total_small = sizes[side, small]
        rows.append(
            f"**{side}**: {(total_big - total_small) / per / 1024:.1f} KiB per session traced"
        )
        rows.append("")
        for title, grown in (
            ("by the library that allocated", libs_big - libs_small),
            (f"by the innermost line of the {side}'s own code", lines_big - lines_small),
        ):
            cells = [f"{n / per:.0f} B {name}" for name, n in grown.most_common(TOP)]
            rows.append(f"- {title}: " + "; ".join(cells))
        rows.append("")
    return rows


def snapshot_sizes(side: str, n: int, settings: Settings) -> tuple[Counter[str], Counter[str], int]:
    """Traced bytes of ``side`` at ``n`` ready sessions: by own-code line, by library, in all."""
    from run import SETTLE_S, Sim, client_command, say, start_client, stop_client

    say(f"profile: tracemalloc, {side}, {n} sessions")
    load_core, measured_core = cores()
    sim = Sim(n, load_core)
    try:
        with tempfile.TemporaryDirectory() as tmp_name, open(Path(tmp_name) / "log", "wb") as log:
            tmp = Path(tmp_name)
            snap = tmp / "snapshot"
            # tracemalloc slows the keeper several times: with the default 5 s request timeout
            # 1,000 concurrent set-ups would time out and retry for ever.
            command = client_command(side, sim, n, settings.interval, tmp, request_timeout=120)
            process = start_client(
                [str(BENCH / "traced.py"), "--snapshot", str(snap), "--frames", "8", *command],
                measured_core,
                log,
            )
            try:
                if not sim.cmd("wait_ready", n=n, timeout=600)["ok"]:
                    raise RuntimeError(f"traced {side}: not all {n} ready")
                time.sleep(SETTLE_S)
                os.kill(process.pid, 10)  # SIGUSR1: traced.py dumps its snapshot
                deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
                while not snap.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"traced {side}: no snapshot")
                    time.sleep(0.2)
            finally:
                stop_client(process)
            snapshot = tracemalloc.Snapshot.load(str(snap))
    finally:
        sim.stop()
    own = "deribit_keeper" if side == "keeper" else "floor.py"
    lines: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    total = 0
    for trace in snapshot.traces:
        frames = list(trace.traceback)  # oldest first
        if any("tracemalloc" in f.filename or "traced.py" in f.filename for f in frames[-1:]):
            continue
        total += trace.size
        ours = [f for f in frames if own in f.filename]
        key = f"{_short(ours[-1].filename)}:{ours[-1].lineno}" if ours else "(outside)"
        lines[key] += trace.size
        libraries[_library(frames[-1].filename)] += trace.size
    return lines, libraries, total


def _short(filename: str) -> str:
    for marker in ("site-packages/", "daemon/", "bench/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _library(filename: str) -> str:
    short = _short(filename)
    if short.startswith("deribit_keeper/"):
        return short
    return short.split("/", 1)[0].removesuffix(".py")
