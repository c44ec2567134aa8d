"""The soak in real time: the simulators in another process, the keeper and its engines here.

``tests/test_soak.py`` runs a day in virtual time; this runs minutes on the real clock over
real loopback, where scheduling, the kernel and two processes' timing are real, and checks the
same invariants with the same code (``tests/soak_support.py``): readiness only with COD on the
link, every dead hop noticed within its bound (plus a second of real-time slack), no order
outliving a dead COD-protected hop, backoff within the policy, no leaks at every check, no
answer or notification reaching the wrong engine. Every minute it prints the counters; it exits
1 if any invariant broke (the violations are printed), 0 otherwise.

    python bench/soak.py --minutes 2 --accounts 4
    python bench/soak.py --minutes 30 --accounts 10 --seed 7     # replay a seed

The simulators' process (``--serve N``, this same file) serves N simulators, one per account
as in the test, and a control port speaking JSON lines: a fault to apply, a view to read, a
wait for orders to close. Its times are its own Trio clock; each answer carries its clock, and
this side moves the times onto its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.soak_support import (  # (after the path: the tests' package is beside bench/)
    Op,
    Plan,
    SimView,
    World,
    apply_ops,
    sim_account,
    sim_view,
    view_from_json,
    view_to_json,
)

from deribit_keeper import logs
from deribit_keeper.config import LogConfig
from deribit_keeper.simulator import Simulator

# ---- the simulators' process --------------------------------------------------------------------


async def serve_simulators(count: int, token_ttl: float) -> None:
    """Serve ``count`` simulators and the control port; print both as one JSON line."""
    sims = []
    async with trio.open_nursery() as nursery:
        for index in range(count):
            sim = Simulator([sim_account(index)], token_ttl_s=token_ttl)
            await nursery.start(sim.serve, 0)
            sims.append(sim)
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        control = int(listener.socket.getsockname()[1])
        print(json.dumps({"control": control, "urls": [s.url for s in sims]}), flush=True)
        handler = _Control(sims)
        await trio.serve_listeners(handler.serve, [listener])


class _Control:
    def __init__(self, sims: Sequence[Simulator]) -> None:
        self.sims = list(sims)

    async def serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while data := await stream.receive_some(65536):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    answer = await self.handle(json.loads(line))
                    answer["now"] = trio.current_time()
                    await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        sim = self.sims[int(request["sim"])]
        client_id = sim_account(int(request["sim"])).client_id
        call = request["call"]
        if call == "apply":
            return {"at": await apply_ops(sim, request["ops"], request["target"])}
        if call == "view":
            return {"view": view_to_json(sim_view(sim, client_id))}
        prefix = str(request["prefix"])

        def closed() -> bool:
            summaries = sim.order_summaries(client_id)
            return not any(
                is_open and label.startswith(prefix) for _, label, is_open, _ in summaries
            )

        with trio.move_on_after(float(request["timeout"])):
            await sim.wait_for(closed)
        return {"ok": closed()}


# ---- this side ----------------------------------------------------------------------------------


class RemoteSim:
    """One simulator in the other process, seen through the control port (one call at a time)."""

    def __init__(self, index: int, url: str, control: _Channel) -> None:
        self.index, self.url, self._control = index, url, control

    async def apply(self, ops: Sequence[Op], target: int | None) -> float:
        answer, shift = await self._control.ask(
            {"sim": self.index, "call": "apply", "ops": ops, "target": target}
        )
        return float(answer["at"]) + shift

    async def view(self) -> SimView:
        answer, shift = await self._control.ask({"sim": self.index, "call": "view"})
        return view_from_json(answer["view"], shift)

    async def until_closed(self, prefix: str, timeout: float) -> bool:
        request = {"sim": self.index, "call": "until_closed", "prefix": prefix, "timeout": timeout}
        answer, _ = await self._control.ask(request)
        return bool(answer["ok"])


class _Channel:
    """JSON lines over one TCP connection per caller: calls from many tasks never interleave,
    and a slow wait (``until_closed``) holds only its own connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[trio.SocketStream] = []

    async def ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The answer, and what to add to the other process's times to get this one's."""
        stream = (
            self._idle.pop() if self._idle else await trio.open_tcp_stream("127.0.0.1", self.port)
        )
        await stream.send_all(json.dumps(request).encode() + b"\n")
        buffer = b""
        while b"\n" not in buffer:
            data = await stream.receive_some(1 << 20)
            if not data:
                raise ConnectionError("the simulators' process went away")
            buffer += data
        self._idle.append(stream)
        answer: dict[str, Any] = json.loads(buffer)
        return answer, trio.current_time() - float(answer["now"])


def bench_plan(args: argparse.Namespace) -> Plan:
    """The test's plan at real-time scale: Deribit's minimum heartbeat, one-minute rounds."""
    return Plan(
        seed=args.seed,
        hours=args.minutes / 60,
        accounts=args.accounts,
        clients=args.clients,
        heartbeat=10.0,
        local_heartbeat=10.0,
        cod_check_interval=15.0,
        token_ttl=120.0,
        backoff_max=5.0,
        round_s=60.0,
        act_s=20.0,
        settle_s=120.0,
        upstream_p=0.6,
        local_p=0.3,
        action_gap=5.0,
        margin=1.0,
    )


async def soak(args: argparse.Namespace, plan: Plan, child: subprocess.Popen[str]) -> int:
    """Run the soak against the simulators of ``child``; 1 if an invariant broke."""
    try:
        assert child.stdout is not None
        ready = json.loads(await trio.to_thread.run_sync(child.stdout.readline))
        control = _Channel(int(ready["control"]))
        sims = [RemoteSim(i, url, control) for i, url in enumerate(ready["urls"])]
        print(
            f"soak: seed={plan.seed} minutes={args.minutes:g} accounts={plan.accounts} "
            f"engines={plan.accounts * plan.clients}, simulators in process {child.pid}",
            flush=True,
        )
        async with trio.open_nursery() as nursery:
            world = World(plan, sims, nursery)
            nursery.start_soon(_every_minute, world)
            with trio.fail_after(args.minutes * 60 * 3 + 300):
                await world.start()
                await world.run()
            world.keeper.stop()
            nursery.cancel_scope.cancel()
    finally:
        child.terminate()
        child.wait(10)
    print(world.summary())
    for line in world.monitor.violations:
        print("VIOLATION", line)
    return 1 if world.monitor.violations else 0


async def _every_minute(world: World) -> None:
    while True:
        await trio.sleep(60)
        print(world.progress(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3, help="engines per account")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--token-ttl", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        # stdout carries the one line that says where to connect; the simulators' log stays off
        logs.configure(LogConfig(level="error", format="json"), stream=sys.stderr)
        trio.run(serve_simulators, args.serve, args.token_ttl)
        return 0
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    if args.accounts < 1 or args.minutes <= 0 or not math.isfinite(args.minutes):
        parser.error("--accounts must be >= 1 and --minutes > 0")
    plan = bench_plan(args)
    with open(os.devnull, "w") as quiet:  # the keeper's own log: faults on purpose are noisy
        logs.configure(LogConfig(level="error", format="json"), stream=quiet)
        serve = ["--serve", str(plan.accounts), "--token-ttl", str(plan.token_ttl)]
        child = subprocess.Popen(
            [sys.executable, __file__, *serve], stdout=subprocess.PIPE, text=True
        )
        return trio.run(soak, args, plan, child)


if __name__ == "__main__":
    sys.exit(main())
