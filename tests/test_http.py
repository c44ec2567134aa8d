"""The operations endpoint over real loopback HTTP: routes, status codes, bodies, and its cost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from deribit_keeper import __version__
from deribit_keeper.gateway import Gateway
from deribit_keeper.http import (
    HEALTH_PATH,
    METRICS_PATH,
    PAGE_PATH,
    READY_PATH,
    STATUS_PATH,
    StatusSource,
    create_app,
    serve_http,
)
from deribit_keeper.metrics import KeeperMetrics
from deribit_keeper.session import Session, SessionState
from deribit_keeper.simulator import Simulator

from .conftest import SECRETS, SIM_ACCOUNTS, LogLines
from .test_metrics import Changes, KeeperStub, open_link, start_keeper

ROUTES = (HEALTH_PATH, READY_PATH, f"{READY_PATH}/main", STATUS_PATH, METRICS_PATH, PAGE_PATH)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


async def http(port: int, path: str, method: str = "GET", send: str = "") -> Reply:
    """One HTTP/1.1 exchange on a fresh connection, read until the server closes it.

    ``send``: header lines (CRLF-terminated) to send instead of ``Connection: close``.
    """
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            send = send or "Connection: close\r\n"
            request = f"{method} {path} HTTP/1.1\r\nHost: keeper\r\n{send}\r\n"
            await stream.send_all(request.encode())
            raw = bytearray()
            while chunk := await stream.receive_some():
                raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return Reply(int(status_line.split()[1]), headers, body)


async def serve(nursery: trio.Nursery, source: StatusSource) -> int:
    port: int = await nursery.start(serve_http, create_app(source), "127.0.0.1", 0)
    return port


def idle_keeper() -> KeeperStub:
    return KeeperStub({}, KeeperMetrics(), Changes([]))


async def test_healthz_follows_the_supervisor_loop(
    nursery: trio.Nursery, log_lines: LogLines, capfd: pytest.CaptureFixture[str]
) -> None:
    """200 while the keeper is alive, 503 once it stops; each request is one debug event."""
    keeper = idle_keeper()
    port = await serve(nursery, keeper)
    ok = await http(port, HEALTH_PATH)
    assert (ok.status, ok.json()) == (200, {"status": "ok"})
    assert ok.headers["cache-control"] == "no-store"
    keeper.running = False
    assert (await http(port, HEALTH_PATH)).status == 503
    requests = log_lines.events("http.request", path=HEALTH_PATH)
    assert [(e["status"], e["level"]) for e in requests] == [(200, "debug"), (503, "debug")]
    assert log_lines.events("http.listening", port=port)
    assert not [e for e in log_lines.events("http.server") if e["level"] != "debug"]
    assert capfd.readouterr() == ("", "")  # hypercorn writes nothing of its own


async def test_readiness_follows_every_account(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """/readyz turns 200 once all are ready, 503 while one link is down, and 200 again."""
    sim.delay_next("public/auth", 3)  # holds one account short of ready for the first probe
    keeper = start_keeper(nursery, sim, "main", "hedge")
    port = await serve(nursery, keeper)
    before = await http(port, READY_PATH)
    assert before.status == 503 and before.json()["ready"] is False

    await keeper.changes.until(keeper.all_ready)
    ready = await http(port, READY_PATH)
    assert ready.status == 200
    assert ready.json() == {"ready": True, "accounts": {"main": "ready", "hedge": "ready"}}

    await sim.drop(open_link(sim, "main"))
    await keeper.changes.until(keeper.states(SessionState.BACKOFF, SessionState.READY))
    down = await http(port, READY_PATH)
    assert down.status == 503
    assert down.json() == {"ready": False, "accounts": {"main": "backoff", "hedge": "ready"}}
    assert (await http(port, f"{READY_PATH}/main")).status == 503
    hedge = await http(port, f"{READY_PATH}/hedge")
    assert (hedge.status, hedge.json()) == (200, {"ready": True, "accounts": {"hedge": "ready"}})

    await keeper.changes.until(keeper.all_ready)
    assert (await http(port, READY_PATH)).status == 200
    keeper.running = False  # stopping: links are about to close, so no longer ready
    assert (await http(port, READY_PATH)).status == 503


@pytest.mark.parametrize(
    "path", [f"{READY_PATH}/nobody", f"{READY_PATH}/", f"{READY_PATH}/%3Cb%3E%22x%26/%22"]
)
async def test_an_unknown_account_is_404_and_never_echoed_raw(
    nursery: trio.Nursery, path: str
) -> None:
    """/readyz/<unknown> is 404 with the name JSON-encoded and HTML metacharacters escaped."""
    keeper = idle_keeper()
    reply = await http(await serve(nursery, keeper), path)
    assert reply.status == 404
    assert reply.headers["x-content-type-options"] == "nosniff"
    body = reply.json()
    assert body["error"] == "unknown account"
    assert body["account"] == unquote(path.removeprefix(READY_PATH + "/"))
    assert not set(reply.body.decode()) & set("<>&")


async def test_status_shows_each_account(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """/status holds every account's snapshot, the ready count and the version."""
    keeper = start_keeper(nursery, sim, "main", "hedge", hedge={"cancel_on_disconnect": "account"})
    port = await serve(nursery, keeper)
    await keeper.changes.until(keeper.all_ready)
    await sim.drop(open_link(sim, "main"))
    await keeper.changes.until(keeper.states(SessionState.BACKOFF, SessionState.READY))

    status = (await http(port, STATUS_PATH)).json()
    assert {k: status[k] for k in ("version", "alive", "ready", "total")} == {
        "version": __version__,
        "alive": True,
        "ready": 1,
        "total": 2,
    }
    main, hedge = status["accounts"]["main"], status["accounts"]["hedge"]
    assert main == {**keeper.sessions["main"].snapshot(), "gateway": None}
    assert (main["state"], main["ready"], main["reconnects"]) == ("backoff", False, 1)
    assert main["last_error"]["reason"] == "closed_by_server"
    assert main["seconds_since_last_message"] is None
    assert (hedge["state"], hedge["cod_scope"], hedge["last_error"]) == ("ready", "account", None)
    assert hedge["cod_confirmed_at"].endswith("Z") and hedge["connected_since"].endswith("Z")
    assert 0 <= hedge["seconds_since_last_message"] < 15


async def test_only_get_and_head_on_known_paths(nursery: trio.Nursery) -> None:
    """Other methods get 405 with Allow, unknown paths 404, HEAD the headers without a body."""
    port = await serve(nursery, idle_keeper())
    for path in ROUTES:
        refused = await http(port, path, "POST")
        assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD")
        head = await http(port, path, "HEAD")
        get = await http(port, path)
        assert (head.status, head.body) == (get.status, b"")
        assert head.headers["content-type"] == get.headers["content-type"]
    assert (await http(port, "/readyz", "DELETE")).status == 405
    missing = await http(port, "/admin")
    assert (missing.status, missing.json()) == (404, {"error": "not found"})
    assert (await http(port, "/healthz/")).status == 404
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    upgrade += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    upgrade += "Sec-WebSocket-Version: 13\r\n"
    assert (await http(port, HEALTH_PATH, send=upgrade)).status == 403  # no WebSocket here


async def test_metrics_route_serves_the_exposition(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """/metrics is the Prometheus text format of the keeper's own registry."""
    keeper = start_keeper(nursery, sim, "main")
    port = await serve(nursery, keeper)
    await keeper.changes.until(keeper.all_ready)
    reply = await http(port, METRICS_PATH)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    ready = families["deribit_keeper_session_ready"].samples
    assert [(s.labels, s.value) for s in ready] == [({"account": "main"}, 1.0)]
    assert families["deribit_keeper_reconnects"].type == "counter"
    assert families["deribit_keeper_request_duration_seconds"].type == "histogram"


async def test_nothing_served_holds_a_secret_or_token(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """After refreshes and reconnects, no body or header of any route holds a secret or token."""
    sim = Simulator(list(SIM_ACCOUNTS), token_ttl_s=60)
    await nursery.start(sim.serve, 0)
    keeper = start_keeper(nursery, sim, "main", "hedge", hedge={"auth": "credentials"})
    port = await serve(nursery, keeper)
    await keeper.changes.until(keeper.all_ready)
    await trio.sleep(130)
    await sim.drop(open_link(sim, "main"), abrupt=True)
    await keeper.changes.until(lambda: keeper.sessions["main"].reconnects == 1)
    served = ""
    for path in ROUTES:
        reply = await http(port, path)
        served += json.dumps(reply.headers) + reply.body.decode()
    assert len(sim.issued_tokens) >= 8
    for secret in (*SECRETS, *sim.issued_tokens):
        assert secret not in served


async def test_a_burst_of_probes_never_reaches_the_simulator(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Two hundred probes and scrapes send nothing to Deribit: the answers come from memory."""
    keeper = start_keeper(nursery, sim, "main", "hedge")
    port = await serve(nursery, keeper)
    await keeper.changes.until(keeper.all_ready)  # frozen clock: no heartbeat will come
    before = [(c.id, len(c.requests), c.open) for c in sim.connections]
    for _ in range(40):
        for path in ROUTES:
            assert (await http(port, path)).status == 200
    assert [(c.id, len(c.requests), c.open) for c in sim.connections] == before
    assert keeper.all_ready()


@dataclass
class BrokenSource:
    sessions: dict[str, Session]
    metrics: KeeperMetrics
    gateways: dict[str, Gateway] = field(default_factory=dict)

    def alive(self) -> bool:
        raise RuntimeError("a bug in alive()")


async def test_a_bug_in_a_route_is_a_500_and_one_log_event(
    nursery: trio.Nursery, log_lines: LogLines, capfd: pytest.CaptureFixture[str]
) -> None:
    """An exception answers 500 and is logged as http.server with its traceback, not on stderr."""
    port = await serve(nursery, BrokenSource({}, KeeperMetrics()))
    assert (await http(port, HEALTH_PATH)).status == 500
    [error] = [e for e in log_lines.events("http.server") if e["level"] == "error"]
    assert "RuntimeError: a bug in alive()" in error["exception"]
    assert capfd.readouterr() == ("", "")


async def test_cancelling_serve_http_closes_the_port(nursery: trio.Nursery) -> None:
    """serve_http runs until cancelled, then the port refuses connections."""
    async with trio.open_nursery() as inner:
        port = await serve(inner, idle_keeper())
        assert (await http(port, HEALTH_PATH)).status == 200
        inner.cancel_scope.cancel()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_port_in_use_is_a_plain_oserror(nursery: trio.Nursery) -> None:
    """A bind failure reaches the caller as the OSError itself, not wrapped in exception groups."""
    port = await serve(nursery, idle_keeper())
    with pytest.raises(OSError, match="in use"):
        await nursery.start(serve_http, create_app(idle_keeper()), "127.0.0.1", port)
