"""The demo a newcomer runs first: the whole lifecycle, faults included, on virtual time."""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from deribit_keeper.config import load_config
from deribit_keeper.demo import FAULTS, run_demo

from .conftest import LogLines

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"


async def test_demo_shows_ready_faults_losses_and_recoveries(
    autojump_clock: trio.testing.MockClock, log_lines: LogLines
) -> None:
    """Ten virtual minutes of the demo: every fault kind happens and every account recovers."""
    await run_demo(
        load_config(DEMO_CONFIG),
        duration_s=615,  # the last fault (at 600 s) has time to heal
        fault_every_s=20,
        rng=random.Random(2),
        handle_signals=False,
    )
    names = log_lines.names()
    assert names[-1] == "keeper.stopped"
    faults = log_lines.events("demo.fault")
    assert {f["fault"] for f in faults} == {name for name, _ in FAULTS}
    reasons = {e["reason"] for e in log_lines.events("session.lost")}
    assert {"connection_dropped", "heartbeat_silence", "closed_by_server"} <= reasons
    assert {"rate_limited", "transient"} <= {
        e["severity"] for e in log_lines.events("session.lost")
    }
    assert "cod_not_confirmed" in reasons
    assert log_lines.events("session.token_refreshed")
    # Every account came back after its last loss.
    for account in ("alpha", "beta", "gamma"):
        mine = log_lines.names(account=account)
        assert "session.ready" in mine
        last_lost = max((i for i, n in enumerate(mine) if n == "session.lost"), default=-1)
        assert "session.ready" in mine[last_lost:]
