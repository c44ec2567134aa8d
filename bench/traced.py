"""Run a program under tracemalloc and dump a snapshot on SIGUSR1: where its memory lives.

The keeper's code must not change for a benchmark, so the profile wraps it: this starts
tracemalloc (``--frames`` deep, enough to reach the keeper's own line under trio and
trio-websocket), installs a SIGUSR1 handler, then runs the program as ``python -m`` or as a
script would. run.py sends SIGUSR1 once every session is ready and idle, waits for the file
(written to a temporary name, then renamed, so that it is never read half-written) and stops
the program. Tracing slows everything and inflates RSS, so traced runs are never the measured
ones.

    python bench/traced.py --snapshot /tmp/keeper.snap -m deribit_keeper run --config C
    python bench/traced.py --snapshot /tmp/floor.snap bench/floor.py --url ... --connections N
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True, help="written on SIGUSR1")
    parser.add_argument("--frames", type=int, default=12, help="traceback depth per allocation")
    parser.add_argument("-m", dest="module", help="run this module as python -m does")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="script and its arguments")
    args = parser.parse_args(argv)

    def dump(signum: int, frame: FrameType | None) -> None:
        partial = args.snapshot.with_suffix(".partial")
        tracemalloc.take_snapshot().dump(str(partial))
        os.replace(partial, args.snapshot)

    signal.signal(signal.SIGUSR1, dump)
    tracemalloc.start(args.frames)
    if args.module:
        sys.argv = [args.module, *args.program]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args.program)
        sys.path.insert(0, str(Path(args.program[0]).resolve().parent))
        runpy.run_path(args.program[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
