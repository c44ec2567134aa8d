"""Idle cost of N sessions: resident memory per session and CPU while heartbeats run.

Starts the simulator and the keeper as two separate processes on loopback (so the keeper's numbers
are its own), waits until every account is ready (/readyz), then watches the keeper's process for
``--seconds`` of idle heartbeating. Run it twice, with 1 and N accounts, and the difference is what
N - 1 sessions cost. A measurement, not a test: it asserts nothing and prints one JSON line.

    python bench/idle_sessions.py --accounts 500 --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deribit_keeper.probe import probe

SIMULATOR = """
import logging, sys, structlog, trio
from deribit_keeper.simulator import SimAccount, Simulator
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
n = int(sys.argv[1])
sim = Simulator([SimAccount(f"a{i}", f"id{i}", f"secret{i}") for i in range(n)],
                max_connections_per_ip=n + 10, token_ttl_s=86400)
async def main():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, 0)
        print(port, flush=True)
trio.run(main)
"""


def quiet_probe(url: str) -> int:
    with contextlib.redirect_stderr(io.StringIO()):
        return probe(url, timeout=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(accounts: int, seconds: float, heartbeat: int) -> dict[str, float]:
    sim = subprocess.Popen(
        [sys.executable, "-c", SIMULATOR, str(accounts)], stdout=subprocess.PIPE, text=True
    )
    keeper = None
    try:
        assert sim.stdout is not None
        port = int(sim.stdout.readline())
        http_port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            lines = [
                "log: {level: warning, format: json}",
                f"http: {{listen: 127.0.0.1:{http_port}}}",
                f"defaults: {{url: 'ws://127.0.0.1:{port}/ws/api/v2', "
                f"heartbeat_interval: {heartbeat}}}",
                "accounts:",
            ]
            lines += [
                f"  - {{name: a{i}, client_id: id{i}, client_secret: secret{i}}}"
                for i in range(accounts)
            ]
            config.write_text("\n".join(lines) + "\n")
            keeper = subprocess.Popen(
                [sys.executable, "-m", "deribit_keeper", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
            )
            started = time.monotonic()
            url = f"http://127.0.0.1:{http_port}/readyz"
            while quiet_probe(url) != 0:  # a benchmark may poll; tests never do
                if time.monotonic() - started > 120:
                    raise RuntimeError("sessions did not all become ready within 120 s")
                time.sleep(0.2)
            ready_s = time.monotonic() - started
            time.sleep(2)  # let the setup's garbage settle
            cpu0, t0 = cpu_seconds(keeper.pid), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = cpu_seconds(keeper.pid), time.monotonic()
            return {
                "accounts": accounts,
                "all_ready_s": round(ready_s, 2),
                "rss_kib": rss_kib(keeper.pid),
                "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            }
    finally:
        for process in (keeper, sim):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=int, default=10)
    args = parser.parse_args()
    one = measure(1, args.seconds, args.heartbeat)
    many = measure(args.accounts, args.seconds, args.heartbeat)
    per_session = (many["rss_kib"] - one["rss_kib"]) / max(args.accounts - 1, 1)
    print(json.dumps({"one": one, "many": many, "rss_kib_per_session": round(per_session, 1)}))


if __name__ == "__main__":
    main()
