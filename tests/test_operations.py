"""The Keeper as an operator runs it: its HTTP endpoint and its conversation with systemd."""

from __future__ import annotations

import dataclasses
import itertools
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from deribit_keeper.config import HttpConfig, load_config
from deribit_keeper.errors import leaves
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import LogLines, account_config, keeper_config
from .test_http import http
from .test_reload import entry, keeper_on, write
from .test_supervisor import all_ready


class Datagrams:
    """systemd's end of NOTIFY_SOCKET: what the keeper told it, in order."""

    def __init__(self, raw: socket.socket, path: str) -> None:
        self.raw, self.path = raw, path

    async def next(self) -> str:
        with trio.fail_after(60):
            return (await trio.socket.from_stdlib_socket(self.raw).recv(65536)).decode()

    async def until(self, prefix: str) -> list[str]:
        """Every datagram up to and including the first that starts with ``prefix``."""
        seen = [await self.next()]
        while not seen[-1].startswith(prefix):
            seen.append(await self.next())
        return seen


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Datagrams]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
        raw.bind(str(tmp_path / "notify"))
        yield Datagrams(raw, str(tmp_path / "notify"))


def with_http(sim: Simulator, *names: str) -> Keeper:
    config = keeper_config(*(account_config(sim, n) for n in names))
    config = dataclasses.replace(config, http=HttpConfig("127.0.0.1", 0))
    return Keeper(config, rng=random.Random(4), environ={})


async def test_the_keeper_serves_health_readiness_status_and_metrics(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """With http.listen set, the Keeper itself answers every route from its live sessions."""
    sim.delay_next("public/auth", 3)
    keeper = with_http(sim, "main", "hedge")
    await nursery.start(keeper.run)
    assert keeper.http_port is not None
    port = keeper.http_port
    assert (await http(port, "/healthz")).status == 200
    assert (await http(port, "/readyz")).status == 503
    await all_ready(keeper)
    assert (await http(port, "/readyz")).status == 200
    assert (await http(port, "/readyz/hedge")).status == 200
    status = (await http(port, "/status")).json()
    assert status["accounts"]["main"]["state"] == "ready"
    metrics = (await http(port, "/metrics")).body.decode()
    families = {f.name for f in text_string_to_metric_families(metrics)}
    assert "deribit_keeper_session_ready" in families
    keeper.stop()
    assert (await http(port, "/healthz")).status == 503


async def test_systemd_hears_ready_status_watchdog_reload_and_stopping(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    notify: Datagrams,
    tmp_path: Path,
) -> None:
    """READY=1 at start (not waiting for Deribit), STATUS, WATCHDOG, RELOADING, STOPPING."""
    path = write(tmp_path / "c.yaml", sim, entry("main"))
    environ = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "30000000"}
    sim.delay_next("public/auth", 20)  # Deribit is slow: READY=1 must not wait for it
    keeper = Keeper(load_config(path), rng=random.Random(4), environ=environ)
    await nursery.start(keeper.run)
    seen = await notify.until("READY=1")
    assert trio.current_time() < 20
    while "WATCHDOG=1" not in seen:  # the first ping goes out at start, in either order
        seen.append(await notify.next())
    statuses = [d for d in await notify.until("STATUS=1/1 ready") if d.startswith("STATUS=")]
    assert statuses[-1] == "STATUS=1/1 ready"
    keeper.reload_from_disk()  # the SIGHUP path adds RELOADING=1 / READY=1 around this
    await keeper._reload_with_systemd()
    reload = await notify.until("READY=1")
    assert any(d.startswith("RELOADING=1\nMONOTONIC_USEC=") for d in reload)
    keeper.stop()
    assert "STOPPING=1" in await notify.until("STOPPING=1")


async def test_a_changed_http_listen_is_reported_as_needing_a_restart(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """The endpoint is bound once; a reload that moves it says a restart is needed."""
    path = write(tmp_path / "c.yaml", sim, entry("main"), top="http: {listen: 0}\n")
    keeper = await keeper_on(nursery, path, environ={})
    write(path, sim, entry("main"), top="http: {listen: 1}\n")
    keeper.reload_from_disk()
    (reloaded,) = log_lines.events("keeper.reloaded")
    assert reloaded["needs_restart"] == ["http.listen"]
    keeper.stop()


async def test_a_new_admin_token_alone_needs_no_restart(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
    tmp_path: Path,
) -> None:
    """The token is read on every request, so a reload that only adds or rotates it takes
    effect at once and must not tell the operator to restart."""
    (tmp_path / "admin.token").write_text("first-admin-token\n")
    path = write(tmp_path / "c.yaml", sim, entry("main"), top="http: {listen: 0}\n")
    keeper = await keeper_on(nursery, path, environ={})
    top = "http: {listen: 0, admin_token_file: admin.token}\n"
    write(path, sim, entry("main"), top=top)
    keeper.reload_from_disk()
    (reloaded,) = log_lines.events("keeper.reloaded")
    assert reloaded["needs_restart"] == []
    keeper.stop()


async def test_an_endpoint_that_cannot_bind_is_a_clear_error(
    autojump_clock: trio.testing.MockClock, sim: Simulator, log_lines: LogLines
) -> None:
    """A port already taken: keeper.http_failed names the address, and run() raises."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = keeper_config(account_config(sim))
        config = dataclasses.replace(config, http=HttpConfig("127.0.0.1", port))
        keeper = Keeper(config, environ={})
        with pytest.raises(BaseExceptionGroup) as caught:
            await keeper.run(handle_signals=False)
        assert [type(e) for e in leaves(caught.value)] == [OSError]
    (failed,) = log_lines.events("keeper.http_failed")
    assert failed["listen"] == f"127.0.0.1:{port}"


async def test_stopping_reaches_systemd_even_when_sessions_end_at_once(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    notify: Datagrams,
) -> None:
    """An account stuck in backoff ends instantly on stop; STOPPING=1 is still sent."""
    sim.refuse_handshakes(1000)
    keeper = Keeper(
        keeper_config(account_config(sim)),
        rng=random.Random(4),
        environ={"NOTIFY_SOCKET": notify.path},
    )
    await nursery.start(keeper.run)
    await notify.until("READY=1")
    await trio.sleep(5)
    keeper.stop()
    assert (await notify.until("STOPPING=1"))[-1] == "STOPPING=1"


async def test_the_watchdog_is_fed_every_half_period(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    notify: Datagrams,
) -> None:
    """WatchdogSec=30 (WATCHDOG_USEC): a ping every 15 s of the loop's own time."""
    environ = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "30000000"}
    keeper = Keeper(keeper_config(account_config(sim)), rng=random.Random(4), environ=environ)
    await nursery.start(keeper.run)
    await notify.until("WATCHDOG=1")
    pings = []
    for _ in range(3):
        await notify.until("WATCHDOG=1")
        pings.append(trio.current_time())
    assert [round(b - a, 3) for a, b in itertools.pairwise(pings)] == [15.0, 15.0]
    keeper.stop()


async def test_metrics_follow_a_reload(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    """A removed account's series disappear from /metrics; an added one's appear."""
    path = write(
        tmp_path / "c.yaml", sim, entry("main") + entry("hedge"), top="http: {listen: 0}\n"
    )
    keeper = await keeper_on(nursery, path, environ={})
    assert keeper.http_port is not None
    write(path, sim, entry("main") + entry("third"), top="http: {listen: 0}\n")
    keeper.reload_from_disk()
    await all_ready(keeper)
    await trio.sleep(1)
    text = (await http(keeper.http_port, "/metrics")).body.decode()
    ready = {
        s.labels["account"]
        for f in text_string_to_metric_families(text)
        if f.name == "deribit_keeper_session_ready"
        for s in f.samples
    }
    assert ready == {"main", "third"}
    keeper.stop()
