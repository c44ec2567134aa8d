"""Security checks end to end: the suite's leak check, a gateway off loopback, accounts apart.

* The leak check (conftest's ``Exposure``) runs after every test; here it is shown to catch a
  leak planted in each kind of output it covers, so that its silence elsewhere means something.
* A gateway that listens on an address other hosts can reach refuses every private method to a
  client that has not authenticated locally, over WebSocket and HTTP, and the configuration
  refuses ``auth: none`` there outright (exit 78).
* One account's gateway is no way into another account: a client of A's gateway, holding B's
  order ids, B's gateway token or B's local credentials, can neither see nor cancel B's orders.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from deribit_keeper import logs
from deribit_keeper.cli import EX_CONFIG, main
from deribit_keeper.config import HttpConfig
from deribit_keeper.errors import SessionLost
from deribit_keeper.gateway import Gateway, local_auth
from deribit_keeper.gateway.link import LocalLink
from deribit_keeper.protocol import ErrorCode
from deribit_keeper.simulator import Simulator
from deribit_keeper.simulator.records import Call, Reply
from deribit_keeper.simulator.session import Dispatcher
from deribit_keeper.supervisor import Keeper

from .conftest import ENGINE, RESEARCH, SIM_ACCOUNTS, Exposure, keeper_config
from .gateway_support import (
    Client,
    gateway_account,
    gateway_config,
    hmac_header,
    http_call,
    http_private,
    local_client,
    ready_and_listening,
    run_keeper,
    until,
)
from .test_gateway_http import http_token
from .test_http import http

BUY = "instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=30000&label=b-http"


# ---- the leak check catches what it should ------------------------------------------------------

Plant = Callable[[pytest.MonkeyPatch, Simulator], None]


def _log_a_local_token(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    # Not a Deribit token: logs.py blanks those by their shape, wherever they are logged.
    real = local_auth.new_token

    def new_token() -> str:
        token = real()
        logs.get_logger().debug("gateway.token_issued", note=f"issued {token}")
        return token

    plant.setattr(local_auth, "new_token", new_token)


def _answer_with_a_deribit_token(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    real = local_auth.LocalGrant.result

    def result(self: local_auth.LocalGrant) -> dict[str, Any]:
        return {**real(self), "upstream_token": sim.issued_tokens[-1]}

    plant.setattr(local_auth.LocalGrant, "result", result)


def _echo_a_local_token(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    real = local_auth.LocalGrant.result

    def result(self: local_auth.LocalGrant) -> dict[str, Any]:
        return {**real(self), "session": self.access_token}  # shown twice in one answer

    plant.setattr(local_auth.LocalGrant, "result", result)


def _local_secret_in_status(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    real = Gateway.snapshot

    def snapshot(self: Gateway) -> dict[str, Any]:
        return {**real(self), "clients": [c.client_secret.reveal() for c in self.config.clients]}

    plant.setattr(Gateway, "snapshot", snapshot)


def _deribit_secret_in_an_error(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    real = Gateway.authenticated

    def authenticated(self: Gateway, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        SessionLost("auth_failed", f"refused {SIM_ACCOUNTS[0].client_secret}")  # made, dropped

    plant.setattr(Gateway, "authenticated", authenticated)


def _relay_the_local_token(plant: pytest.MonkeyPatch, sim: Simulator) -> None:
    plant.setattr(LocalLink, "_check_private", lambda self, request: None)  # keeps access_token


PLANTS: dict[str, tuple[str, Plant]] = {
    "a local token in a log line": ("output", _log_a_local_token),
    "a Deribit token in a gateway answer": ("served", _answer_with_a_deribit_token),
    "a local token outside the answer that issued it": ("served", _echo_a_local_token),
    "a local secret on /status": ("served", _local_secret_in_status),
    "a Deribit secret in an exception's text": ("output", _deribit_secret_in_an_error),
    "a local token relayed to Deribit": ("upstream", _relay_the_local_token),
}


async def run_keeper_with_endpoint(nursery: trio.Nursery, sim: Simulator) -> Keeper:
    """A Keeper of "main" with a gateway and the operations endpoint, both on free ports."""
    config = dataclasses.replace(
        keeper_config(gateway_account(sim)), http=HttpConfig("127.0.0.1", 0)
    )
    keeper = Keeper(config, rng=random.Random(5))
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(keeper, ready_and_listening(keeper))
    return keeper


async def use_everything(keeper: Keeper) -> None:
    """What the plants hook into: a local auth, a private call carrying its token, /status."""
    async with local_client(keeper.gateways["main"]) as client:
        grant = await client.auth()
        await client.call("private/get_open_orders", {"access_token": grant["access_token"]})
        assert keeper.http_port is not None
        assert (await http(keeper.http_port, "/status")).status == 200


def caught(exposure: Exposure) -> list[str]:
    """What the leak check finds now; then forgotten, so that the test's own teardown passes."""
    found = exposure.problems()
    exposure.clear()
    return found


async def test_the_leak_check_sees_the_served_answers_and_finds_nothing_in_a_clean_run(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    exposure: Exposure,
) -> None:
    """Without a plant the same run is clean, though the served answers hold the issued local
    token (its one allowed place) and the simulator issued Deribit tokens."""
    keeper = await run_keeper_with_endpoint(nursery, sim)
    await use_everything(keeper)
    assert exposure.local_tokens and sim.issued_tokens
    assert any(exposure.local_tokens[0] in text for text in exposure.served)
    assert any('"accounts"' in text for text in exposure.served)  # /status, served
    assert exposure.problems() == []


@pytest.mark.parametrize("name", list(PLANTS))
async def test_the_leak_check_finds_a_planted_leak(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    exposure: Exposure,
    name: str,
) -> None:
    """Each kind of output the check covers, given a secret or a token, fails the check there."""
    where, plant = PLANTS[name]
    keeper = await run_keeper_with_endpoint(nursery, sim)
    with pytest.MonkeyPatch.context() as patch:
        plant(patch, sim)
        await use_everything(keeper)
        found = caught(exposure)
    assert any(line.startswith(f"{where}:") for line in found), found


# ---- a gateway off loopback ---------------------------------------------------------------------


def own_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed by default, never reached
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


OWN = own_address()
# Listen on every interface, and on the machine's own address; reach each from outside loopback.
OFF_LOOPBACK = [
    pytest.param("0.0.0.0", OWN or "127.0.0.1", id="every-interface"),
    pytest.param(
        OWN or "",
        OWN or "",
        id="own-address",
        marks=pytest.mark.skipif(OWN is None, reason="no non-loopback address here"),
    ),
]


@asynccontextmanager
async def connect_at(host: str, port: int) -> AsyncIterator[Client]:
    """A local client of the gateway at ``host:port`` (gateway_support's reaches loopback)."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream(host, port)
        try:
            ws = await wrap_client_stream(nursery, stream, f"{host}:{port}", "/ws/api/v2")
            client = Client(ws, stream, answer_heartbeats=True)
            nursery.start_soon(client.read)
            yield client
            await ws.aclose()
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def http_at(host: str, port: int, target: str, headers: str = "") -> tuple[int, str]:
    """One GET to ``host:port``: its status and body."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(host, port) as stream:
            head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n"
            await stream.send_all(head.encode())
            raw = bytearray()
            while chunk := await stream.receive_some():
                raw += chunk
    status_line, _, rest = bytes(raw).decode().partition("\r\n")
    return int(status_line.split()[1]), rest.partition("\r\n\r\n")[2]


def deribit_error(answer: dict[str, Any]) -> int:
    assert "result" not in answer, answer
    code: int = answer["error"]["code"]
    return code


@pytest.mark.parametrize(("listen", "reach"), OFF_LOOPBACK)
async def test_a_gateway_off_loopback_refuses_private_methods_without_local_auth(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    listen: str,
    reach: str,
) -> None:
    """13009 over WebSocket and HTTP for an unauthenticated client, a made-up token or one of
    Deribit's own tokens; Deribit's secret is no local credential (13004); nothing is placed."""
    keeper = await run_keeper(nursery, gateway_account(sim, gateway=gateway_config(host=listen)))
    port = keeper.gateways["main"].port
    assert port is not None
    deribit_token = sim.issued_tokens[0]
    buy = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": 40000}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("private/buy", buy),
        ("private/get_open_orders", {}),
        ("private/get_open_orders", {"access_token": "made-up"}),
        ("private/cancel_all", {"access_token": deribit_token}),
    ]
    async with connect_at(reach, port) as client:
        for method, params in calls:
            assert deribit_error(await client.call(method, params)) == ErrorCode.UNAUTHORIZED
        with_deribits_secret = {
            "grant_type": "client_credentials",
            "client_id": SIM_ACCOUNTS[0].client_id,
            "client_secret": SIM_ACCOUNTS[0].client_secret,
        }
        answer = await client.call("public/auth", with_deribits_secret)
        assert deribit_error(answer) == ErrorCode.INVALID_CREDENTIALS
    for token in [None, "made-up", deribit_token]:
        headers = "" if token is None else f"Authorization: bearer {token}\r\n"
        for target in ["/api/v2/private/get_open_orders", f"/api/v2/private/buy?{BUY}"]:
            status, body = await http_at(reach, port, target, headers)
            assert (status, json.loads(body)["error"]["code"]) == (400, 13009), body
    assert sim.orders("main-id") == []


@pytest.mark.parametrize("listen", ["0.0.0.0:9601", "[::]:9601", f"{OWN or '10.0.0.5'}:9601"])
@pytest.mark.parametrize("command", ["check", "run"])
def test_auth_none_off_loopback_is_refused_with_exit_78(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    listen: str,
    command: str,
) -> None:
    """``auth: none`` on an address other hosts reach never loads: one stderr line naming the
    key, exit 78, for ``check`` and for ``run`` alike (which then never listens)."""
    monkeypatch.setenv("MAIN_SECRET", SIM_ACCOUNTS[0].client_secret)
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            accounts:
              - name: main
                client_id: main-id
                client_secret: ${{MAIN_SECRET}}
                url: ws://127.0.0.1:9/ws/api/v2
                gateway: {{listen: "{listen}", auth: none}}
            """
        )
    )
    assert main([command, "--config", str(config)]) == EX_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert "accounts[0].gateway.auth: none is only allowed on a loopback listen" in line


# ---- accounts kept apart ------------------------------------------------------------------------


async def two_gateways(
    nursery: trio.Nursery, sim: Simulator
) -> tuple[Gateway, Gateway, list[dict[str, Any]]]:
    """main's gateway (for ENGINE) and hedge's (for RESEARCH), and two open orders of hedge's,
    placed through hedge's gateway over WebSocket and HTTP."""
    keeper = await run_keeper(
        nursery,
        gateway_account(sim, "main", gateway=gateway_config(clients=(ENGINE,))),
        gateway_account(sim, "hedge", gateway=gateway_config(clients=(RESEARCH,))),
    )
    main_gw, hedge_gw = keeper.gateways["main"], keeper.gateways["hedge"]
    assert hedge_gw.port is not None
    async with local_client(hedge_gw) as b:
        await b.auth(RESEARCH)
        orders = [await b.buy(price=30000, label="b-ws")]
    answer = await http_private(hedge_gw.port, "private/buy", BUY, client=RESEARCH)
    orders.append(answer.body["result"]["order"])
    return main_gw, hedge_gw, orders


def credentials(client_id: str, secret: str) -> dict[str, Any]:
    return {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}


async def test_another_gateways_tokens_and_credentials_are_refused_by_this_one(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """On main's gateway: hedge's local client (13004), hedge's Deribit key (13004), a token
    hedge's gateway issued (13009, WebSocket and HTTP) and a signature by hedge's client
    (13004) are all refused, and hedge's orders stay open."""
    main_gw, hedge_gw, b_orders = await two_gateways(nursery, sim)
    assert main_gw.port is not None and hedge_gw.port is not None
    async with local_client(hedge_gw) as b:
        b_grant = await b.auth(RESEARCH)
    b_token = await http_token(hedge_gw.port, RESEARCH)
    cancel = f"/api/v2/private/cancel?order_id={b_orders[0]['order_id']}"
    async with local_client(main_gw) as a:
        for client_id, secret in [
            (RESEARCH.client_id, RESEARCH.client_secret.reveal()),
            (SIM_ACCOUNTS[1].client_id, SIM_ACCOUNTS[1].client_secret),
        ]:
            answer = await a.call("public/auth", credentials(client_id, secret))
            assert deribit_error(answer) == ErrorCode.INVALID_CREDENTIALS
        for token in (b_grant["access_token"], b_token):
            answer = await a.call("private/cancel_all", {"access_token": token})
            assert deribit_error(answer) == ErrorCode.UNAUTHORIZED
    for header, code in [
        (f"bearer {b_token}", ErrorCode.UNAUTHORIZED),
        (hmac_header(RESEARCH, "GET", cancel), ErrorCode.INVALID_CREDENTIALS),
    ]:
        refused = await http_call(main_gw.port, "GET", cancel, headers=(("Authorization", header),))
        assert (refused.status, refused.body["error"]["code"]) == (400, code)
    still_open = {o["order_id"] for o in sim.open_orders("hedge-id")}
    assert still_open == {o["order_id"] for o in b_orders}


async def test_another_accounts_order_ids_labels_and_events_are_out_of_reach(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """An authenticated client of main's gateway, with hedge's order ids and labels, can read,
    edit or cancel none of hedge's orders, lists only main's, cancels only main's with
    cancel_all (WebSocket and HTTP), and hears nothing of hedge's on user.orders."""
    main_gw, hedge_gw, b_orders = await two_gateways(nursery, sim)
    assert main_gw.port is not None
    b_ids = {o["order_id"] for o in b_orders}
    channel = "user.orders.BTC-PERPETUAL.raw"
    async with local_client(main_gw) as a, local_client(hedge_gw) as b:
        await a.auth()
        await b.auth(RESEARCH)
        await a.result("private/subscribe", {"channels": [channel]})
        a_order = await a.buy(price=31000, label="a-ws")
        for order_id in b_ids:
            for method, params in [
                ("private/get_order_state", {"order_id": order_id}),
                ("private/cancel", {"order_id": order_id}),
                ("private/edit", {"order_id": order_id, "amount": 20, "price": 30500}),
            ]:
                assert "error" in await a.call(method, params), method
        for label in ("b-ws", "b-http"):
            await a.call("private/cancel_by_label", {"label": label})
        for method, params in [
            ("private/get_open_orders", {}),
            ("private/get_open_orders_by_currency", {"currency": "BTC"}),
            ("private/get_open_orders_by_instrument", {"instrument_name": "BTC-PERPETUAL"}),
        ]:
            seen = {o["order_id"] for o in await a.result(method, params)}
            assert seen == {a_order["order_id"]}, method
        assert await a.result("private/cancel_all") == 1  # main's one order
        over_http = await http_private(main_gw.port, "private/cancel_all")
        assert (over_http.status, over_http.body["result"]) == (200, 0)

        late = await b.buy(price=29000, label="b-late")
        await b.result("private/cancel", {"order_id": late["order_id"]})
        # Relayed over main's upstream, so answered after anything Deribit queued there first.
        await a.result("public/get_time")
        assert {o["order_id"] for o in a.notifications(channel)} == {a_order["order_id"]}
    assert {o["order_id"] for o in sim.open_orders("hedge-id")} == b_ids


def _deribit_lists_api_keys(plant: pytest.MonkeyPatch) -> None:
    """Teach the simulator ``private/list_api_keys`` as Deribit answers it: every API key of the
    account, each with its ``client_secret`` (scope ``account:read``, which
    ``private/get_account_summary`` needs too)."""
    real = Dispatcher.handle

    def handle(self: Dispatcher, method: str, call: Call) -> Reply:
        if method != "private/list_api_keys":
            return real(self, method, call)
        client_id = self._client(call)
        [account] = [a for a in SIM_ACCOUNTS if a.client_id == client_id]
        key = {"id": 1, "client_id": client_id, "client_secret": account.client_secret}
        return Reply([{**key, "enabled": True, "default": True, "max_scope": "account:read"}])

    plant.setattr(Dispatcher, "handle", handle)


async def test_a_local_client_cannot_read_deribits_api_secrets_through_the_gateway(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    exposure: Exposure,
) -> None:
    """``private/list_api_keys`` through the gateway never shows Deribit's client_secret: the
    gateway refuses the method itself, and the simulator never sees it."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    with pytest.MonkeyPatch.context() as patch:
        _deribit_lists_api_keys(patch)
        async with local_client(gateway) as client:
            await client.auth()
            await client.call("private/list_api_keys")
        await http_private(gateway.port, "private/list_api_keys")
    leaked = caught(exposure)
    relayed = [c.methods().count("private/list_api_keys") for c in sim.connections]
    assert (leaked, sum(relayed)) == ([], 0)
