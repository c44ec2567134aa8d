"""KeeperMetrics: every series follows the sessions' events, and forget() leaves nothing behind."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from deribit_keeper import __version__
from deribit_keeper.gateway import Gateway
from deribit_keeper.metrics import KeeperMetrics
from deribit_keeper.session import Session, SessionState
from deribit_keeper.simulator import SimConnection, Simulator

from .conftest import SIM_ACCOUNTS, LogLines, account_config

P = "deribit_keeper_"


class Changes:
    """Wakes its waiters at every event of the sessions it watches, so tests never poll."""

    def __init__(self, sessions: Iterable[Session]) -> None:
        self._event = trio.Event()
        for session in sessions:
            session.watch(self._wake)

    def _wake(self, *_: object) -> None:
        woken, self._event = self._event, trio.Event()
        woken.set()

    async def until(self, predicate: Callable[[], bool], within: float = 600) -> None:
        """Return once ``predicate()`` holds; fail after ``within`` (virtual) seconds."""
        with trio.fail_after(within):
            while not predicate():
                await self._event.wait()


@dataclass
class KeeperStub:
    """A StatusSource made of real Sessions and a real KeeperMetrics, as the Keeper wires them."""

    sessions: dict[str, Session]
    metrics: KeeperMetrics
    changes: Changes
    running: bool = True
    gateways: dict[str, Gateway] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.running

    def all_ready(self) -> bool:
        return all(s.state is SessionState.READY for s in self.sessions.values())

    def states(self, *wanted: SessionState) -> Callable[[], bool]:
        """A predicate: each session (in order) is in the state given for it."""
        return lambda: [s.state for s in self.sessions.values()] == list(wanted)


def start_keeper(
    nursery: trio.Nursery, sim: Simulator, *names: str, **overrides: Any
) -> KeeperStub:
    """Run a Session per account name against ``sim``, tracked by one KeeperMetrics."""
    metrics = KeeperMetrics()
    sessions: dict[str, Session] = {}
    for seed, name in enumerate(names):
        account = account_config(sim, name, **overrides.get(name, {}))
        sessions[name] = Session(account, rng=random.Random(seed), on_request=metrics.on_request)
        metrics.track(sessions[name])
    stub = KeeperStub(sessions, metrics, Changes(sessions.values()))
    for session in sessions.values():
        nursery.start_soon(session.run)
    return stub


def open_link(sim: Simulator, account: str) -> SimConnection:
    """The account's open connection on the simulator (earlier ones may have failed)."""
    [link] = [c for c in sim.connections if c.client_id == f"{account}-id" and c.open]
    return link


def scrape(metrics: KeeperMetrics) -> list[Sample]:
    body, _ = metrics.render()
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly these labels, or None if there is none."""
    found = [s.value for s in samples if s.name == P + name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


async def test_a_lifecycle_shows_in_every_family(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, log_lines: LogLines
) -> None:
    """Ready, heartbeats, a token refresh and a dropped link each move their own series."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=60)
    await nursery.start(sim.serve, 0)
    keeper = start_keeper(nursery, sim, "main", "hedge", hedge={"cancel_on_disconnect": "account"})
    main = keeper.sessions["main"]
    keeper.metrics.track(main)  # tracked twice: still counted once
    await keeper.changes.until(keeper.all_ready)
    await trio.sleep(70)  # six test_requests each, one token refresh at 48 s
    await sim.drop(open_link(sim, "main"), abrupt=True)
    await keeper.changes.until(lambda: main.reconnects == 1 and keeper.all_ready())

    got = scrape(keeper.metrics)
    reason = log_lines.events("session.lost", account="main")[0]["reason"]
    for name, scope in (("main", "connection"), ("hedge", "account")):
        assert value(got, "session_ready", account=name) == 1
        assert value(got, "cod_enabled", account=name, scope=scope) == 1
        assert value(got, "session_state", account=name, state="ready") == 1
        assert value(got, "session_state", account=name, state="backoff") == 0
        answered = keeper.sessions[name].test_requests_answered
        assert answered >= 6
        assert value(got, "test_requests_answered_total", account=name) == answered
        assert value(got, "token_refreshes_total", account=name) == 1
        assert value(got, "token_refresh_failures_total", account=name) == 0
        assert value(got, "heartbeat_interval_seconds", account=name) == 10
        silence = value(got, "inbound_silence_seconds", account=name)
        assert silence is not None and 0 <= silence < 15
    assert value(got, "reconnects_total", account="main", reason=reason) == 1
    assert value(got, "reconnects_total", account="hedge", reason=reason) is None
    assert value(got, "session_setup_duration_seconds_count") == 3
    assert (value(got, "request_duration_seconds_count", method="public/test") or 0) >= 12
    # Three authentications and two refreshes, which are public/auth calls too.
    assert value(got, "request_duration_seconds_count", method="public/auth") == 5
    assert value(got, "build_info", version=__version__) == 1


async def test_refused_and_failed_token_refreshes_are_counted(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A refused refresh counts one failure (a fresh auth follows, on the same link); one left
    unanswered counts another and ends the link. Alerts page on this counter."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=60)
    await nursery.start(sim.serve, 0)
    keeper = start_keeper(nursery, sim, "main")
    main = keeper.sessions["main"]
    await keeper.changes.until(keeper.all_ready)
    sim.fail_next("public/auth", 13009)
    await trio.sleep(50)  # the refresh at 48 s: refused, then a fresh auth
    assert value(scrape(keeper.metrics), "token_refresh_failures_total", account="main") == 1
    assert main.reconnects == 0
    sim.delay_next("public/auth", 60)
    await keeper.changes.until(lambda: main.reconnects == 1)
    assert value(scrape(keeper.metrics), "token_refresh_failures_total", account="main") == 2


async def test_state_gauges_follow_a_lost_link(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Before the start, in backoff and when ready again: state, ready, COD and silence agree."""
    keeper = start_keeper(nursery, sim, "main")
    got = scrape(keeper.metrics)
    assert value(got, "session_state", account="main", state="stopped") == 1
    assert value(got, "session_ready", account="main") == 0
    assert value(got, "inbound_silence_seconds", account="main") is None  # no link, no series
    await keeper.changes.until(keeper.all_ready)
    await sim.drop(open_link(sim, "main"))
    await keeper.changes.until(keeper.states(SessionState.BACKOFF))
    got = scrape(keeper.metrics)
    assert value(got, "session_state", account="main", state="backoff") == 1
    assert value(got, "session_state", account="main", state="ready") == 0
    assert value(got, "session_ready", account="main") == 0
    assert value(got, "cod_enabled", account="main", scope="connection") == 0
    assert value(got, "inbound_silence_seconds", account="main") is None
    await keeper.changes.until(keeper.all_ready)
    assert value(scrape(keeper.metrics), "cod_enabled", account="main", scope="connection") == 1


async def test_silence_is_measured_at_scrape_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """With Deribit silent, the gauge grows with the clock though no event happens."""
    keeper = start_keeper(nursery, sim, "main")
    await keeper.changes.until(keeper.all_ready)
    sim.go_silent(open_link(sim, "main"))
    await trio.sleep(8)  # the link is declared dead at 12 s of silence
    first = value(scrape(keeper.metrics), "inbound_silence_seconds", account="main")
    await trio.sleep(2)
    second = value(scrape(keeper.metrics), "inbound_silence_seconds", account="main")
    assert first is not None and second is not None
    assert 8 <= first < 10
    assert second - first == pytest.approx(2)


async def test_forget_removes_every_series_of_an_account(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """After forget(), no series names the account, even as its session keeps emitting events."""
    keeper = start_keeper(nursery, sim, "main", "hedge")
    main = keeper.sessions["main"]
    await keeper.changes.until(keeper.all_ready)
    await sim.drop(open_link(sim, "main"))
    await keeper.changes.until(lambda: main.reconnects == 1 and keeper.all_ready())
    assert any(s.labels.get("account") == "main" for s in scrape(keeper.metrics))

    keeper.metrics.forget("main")
    keeper.metrics.forget("main")  # twice, or never tracked: nothing to do
    keeper.metrics.forget("nobody")
    await sim.drop(open_link(sim, "main"))
    await keeper.changes.until(lambda: main.reconnects == 2 and keeper.all_ready())
    got = scrape(keeper.metrics)
    assert [s for s in got if s.labels.get("account") == "main"] == []
    assert value(got, "session_ready", account="hedge") == 1

    # A reload that changes the account tracks a new Session under the same name.
    keeper.metrics.track(Session(account_config(sim, "main")))
    got = scrape(keeper.metrics)
    assert value(got, "session_state", account="main", state="stopped") == 1
    assert value(got, "test_requests_answered_total", account="main") == 0


def test_request_durations_land_in_their_buckets() -> None:
    """on_request() fills the method's histogram; buckets run from 1 ms to 10 s."""
    metrics = KeeperMetrics()
    metrics.on_request("public/test", 0.003)
    metrics.on_request("public/test", 20.0)
    got = scrape(metrics)

    def bucket(le: str) -> float | None:
        return value(got, "request_duration_seconds_bucket", method="public/test", le=le)

    assert (bucket("0.001"), bucket("0.0025"), bucket("0.005")) == (0, 0, 1)
    assert (bucket("10.0"), bucket("+Inf")) == (1, 2)
    assert value(got, "request_duration_seconds_sum", method="public/test") == pytest.approx(20.003)


def test_each_keeper_has_its_own_registry() -> None:
    """Two KeeperMetrics in one process do not collide; the global registry stays clean."""
    first, second = KeeperMetrics(), KeeperMetrics()
    first.on_request("public/hello", 0.01)
    assert value(scrape(second), "request_duration_seconds_count", method="public/hello") is None
    assert (
        prometheus_client.REGISTRY.get_sample_value(P + "build_info", {"version": __version__})
        is None
    )
    body, content_type = first.render()
    assert content_type.startswith("text/plain; version=")
    assert f'{P}build_info{{version="{__version__}"}} 1.0'.encode() in body
    assert b"_created" not in body  # creation-time twins of every counter are left out
