"""``deribit-keeper demo``: the simulator and the keeper in one process, with faults now and then.

A newcomer sees the whole lifecycle in a terminal within a minute: sessions come up with COD
confirmed, test_requests are answered, and every ``fault_every_s`` seconds the demo breaks one link
in a new way (a reset, a silent link, a clean close, a rate limit, an unconfirmed COD) and the
keeper notices, backs off and comes back.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from . import events
from .config import KeeperConfig
from .logs import get_logger
from .protocol import ErrorCode
from .simulator import SimAccount, SimConnection, Simulator
from .supervisor import Keeper

DEMO_TOKEN_TTL_S: Final = 60.0  # short, so that token refreshes show up in the demo too

Fault = Callable[[Simulator, SimConnection], Awaitable[None]]


async def _reset(sim: Simulator, conn: SimConnection) -> None:
    await sim.drop(conn, abrupt=True)


async def _silence(sim: Simulator, conn: SimConnection) -> None:
    sim.go_silent(conn)


async def _clean_close(sim: Simulator, conn: SimConnection) -> None:
    await sim.drop(conn)


async def _rate_limit(sim: Simulator, conn: SimConnection) -> None:
    sim.fail_next("public/auth", ErrorCode.TOO_MANY_REQUESTS, close_after=True)
    await sim.drop(conn, abrupt=True)


async def _cod_unconfirmed(sim: Simulator, conn: SimConnection) -> None:
    sim.misreport_cod()
    await sim.drop(conn, abrupt=True)


FAULTS: Final[tuple[tuple[str, Fault], ...]] = (
    ("tcp_reset", _reset),
    ("silent_link", _silence),
    ("clean_close", _clean_close),
    ("rate_limited_reconnect", _rate_limit),
    ("cod_not_confirmed", _cod_unconfirmed),
)


def pointed_at(config: KeeperConfig, url: str) -> KeeperConfig:
    """The same config with every account's endpoint replaced by ``url``."""
    accounts = tuple(dataclasses.replace(a, url=url, environment=None) for a in config.accounts)
    return dataclasses.replace(config, accounts=accounts)


async def _inject_faults(
    sim: Simulator, config: KeeperConfig, every_s: float, rng: random.Random
) -> None:
    log = get_logger()
    account_of = {a.client_id: a.name for a in config.accounts}
    for name, fault in itertools.cycle(FAULTS):
        await trio.sleep(every_s)
        victims = [c for c in sim.connections if c.open and c.heartbeat_interval is not None]
        if victims:
            victim = rng.choice(victims)
            account = account_of.get(victim.client_id or "", "?")
            log.warning(events.DEMO_FAULT, fault=name, account=account, connection=victim.id)
            await fault(sim, victim)


async def run_demo(
    config: KeeperConfig,
    *,
    duration_s: float | None = None,
    fault_every_s: float = 20.0,
    rng: random.Random | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the simulator and a keeper on it until Ctrl-C (or for ``duration_s`` seconds).

    The accounts of ``config`` become the simulator's accounts; their endpoints are replaced.
    """
    sim = Simulator(
        [SimAccount(a.name, a.client_id, a.client_secret.reveal()) for a in config.accounts],
        token_ttl_s=DEMO_TOKEN_TTL_S,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, 0)
        keeper = Keeper(pointed_at(config, sim.url), rng=rng)
        nursery.start_soon(_inject_faults, sim, config, fault_every_s, rng or random.Random())
        if duration_s is not None:
            nursery.start_soon(_stop_after, keeper, duration_s)
        await keeper.run(handle_signals=handle_signals)
        nursery.cancel_scope.cancel()


async def _stop_after(keeper: Keeper, seconds: float) -> None:
    await trio.sleep(seconds)
    keeper.stop(reason="demo duration reached")
