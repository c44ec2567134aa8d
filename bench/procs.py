"""What every benchmark here needs to know about the processes it measures: /proc and cores.

The figures are ratios and differences between processes measured side by side, so they must
all be read the same way: resident memory is ``VmRSS`` and CPU is ``utime + stime`` from /proc,
and each process is pinned to a core with ``os.sched_setaffinity`` so that the simulator never
takes the measured process's core (the machine has two).

The simulator script (the real one, ``deribit_keeper.simulator``, for the gateway figures that
need its exchange) lives here too, so gateway_roundtrip.py and run.py start it alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

# The real simulator with N accounts a<i> / id<i> / secret<i>, printing its port first. Logs
# only warnings and worse: a benchmark must not be slowed down by its own simulator's logging.
SIMULATOR: Final = """
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

# Which core each side gets: the load (simulators, the benchmark's own clients) on one, what is
# measured (the keeper, the floor, the bare relays) on the other. On a one-core machine both
# are core 0 and the figures say so (``cores()``).
LOAD_CORE: Final = 0
MEASURED_CORE: Final = 1


# Read once, at import: pinning this process later (gateway_roundtrip.py pins itself to the
# load core) must not shrink what the next measurement may use.
_AVAILABLE: Final = sorted(os.sched_getaffinity(0))


def cores() -> tuple[int, int]:
    """(load core, measured core); the same core twice where only one is available."""
    if len(_AVAILABLE) < 2:
        return _AVAILABLE[0], _AVAILABLE[0]
    return _AVAILABLE[LOAD_CORE], _AVAILABLE[MEASURED_CORE]


def pin(pid: int, core: int) -> None:
    """Keep ``pid`` (0: this process) on ``core``; its threads started later inherit it."""
    os.sched_setaffinity(pid, {core})


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (VmRSS: what the process really holds in RAM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
