"""Clients that behave like NautilusTrader and ccxt get exactly what Deribit would answer.

Each client's conversation (the requests, the order, the ids they use, as read from their
sources and recorded on the wire) runs twice: straight against the simulator, which stands in
for Deribit, and through the keeper's gateway. Every answer must have the same shape (keys and
JSON types) and the same error codes both ways; only values that differ on Deribit too (ids,
timestamps, tokens) may differ.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio
import trio.testing
import wsproto
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from deribit_keeper.config import LocalClient, Secret
from deribit_keeper.gateway import Gateway
from deribit_keeper.protocol import sign
from deribit_keeper.simulator import Simulator

from .conftest import ENGINE, SIM_ACCOUNTS
from .gateway_support import Client, connect, gateway_account, run_keeper

DERIBIT_KEY = LocalClient(SIM_ACCOUNTS[0].client_id, Secret(SIM_ACCOUNTS[0].client_secret))
Flow = Callable[[Client, LocalClient], Awaitable[list[dict[str, Any]]]]


def sim_port(sim: Simulator) -> int:
    port = urlsplit(sim.url).port
    assert port is not None
    return port


def shape(value: Any) -> Any:
    """Keys and JSON types, recursively: what a client's parser depends on."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


async def nautilus_like(client: Client, key: LocalClient) -> list[dict[str, Any]]:
    """NautilusTrader's execution client: set_heartbeat first, auth without waiting for its
    answer (client_signature, a UUID nonce, scope session:NAME), ids from 1, one subscribe per
    channel, then buy (label = client order id), get_order_state, cancel."""
    await client.send("public/set_heartbeat", {"interval": 30}, id=1)
    timestamp, nonce = int(time.time() * 1000), str(uuid.uuid4())
    signature = sign(key.client_secret.reveal(), timestamp, nonce, "")
    auth = {
        "grant_type": "client_signature",
        "client_id": key.client_id,
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": signature,
        "data": "",
        "scope": "session:nautilus-execution",
    }
    await client.send("public/auth", auth, id=2)
    await client.wait_for(lambda: client.answer(2) is not None)
    answers = [client.answer(1), client.answer(2)]
    request_id = 3
    for channel in ("user.orders.any.any.raw", "user.trades.any.any.raw", "user.portfolio.any"):
        answers.append(
            await client.call("private/subscribe", {"channels": [channel]}, id=request_id)
        )
        request_id += 1
    buy = {
        "instrument_name": "BTC-PERPETUAL",
        "amount": 10.0,
        "type": "limit",
        "label": "O-20261202-001",
        "price": 40000.0,
        "time_in_force": "good_til_cancelled",
    }
    bought = await client.call("private/buy", buy, id=request_id)
    order_id = bought["result"]["order"]["order_id"]
    answers.append(bought)
    answers.append(await client.call("private/get_order_state", {"order_id": order_id}, id=20))
    answers.append(await client.call("private/cancel", {"order_id": order_id}, id=21))
    answers.append(await client.call("private/cancel", {"order_id": order_id}, id=22))  # 11044
    await client.wait_for(lambda: len(client.notifications("user.orders.any.any.raw")) >= 2)
    states = [o["order_state"] for o in client.notifications("user.orders.any.any.raw")]
    assert states[:2] == ["open", "cancelled"]
    labels = {o["label"] for o in client.notifications("user.orders.any.any.raw")}
    assert labels == {"O-20261202-001"}
    return [a for a in answers if a is not None]


async def compare(
    nursery: trio.Nursery, sim: Simulator, flow: Flow
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``flow`` against the simulator directly, then through a gateway; both answer lists."""
    keeper = await run_keeper(nursery, gateway_account(sim, "hedge"), gateway_account(sim))
    gateway = keeper.gateways["main"]
    async with connect(sim_port(sim)) as direct:
        deribit = await flow(direct, DERIBIT_KEY)
    assert gateway.port is not None
    async with connect(gateway.port) as engine:
        relayed = await flow(engine, ENGINE)
    return deribit, relayed


def assert_same_answers(deribit: list[dict[str, Any]], relayed: list[dict[str, Any]]) -> None:
    assert [a.get("id") for a in relayed] == [a.get("id") for a in deribit]
    for direct, through in zip(deribit, relayed, strict=True):
        assert through.keys() == direct.keys()
        if "error" in direct:
            assert through["error"] == direct["error"]
        else:
            assert shape(through["result"]) == shape(direct["result"])


async def test_a_nautilus_like_client_gets_what_deribit_answers(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Same ids, same keys and types, same errors; the scope it asked for comes back."""
    deribit, relayed = await compare(nursery, sim, nautilus_like)
    assert_same_answers(deribit, relayed)
    assert relayed[1]["result"]["scope"].startswith("session:nautilus-execution")
    assert isinstance(relayed[1]["result"]["expires_in"], int)
    assert relayed[-1]["error"]["code"] == 11044


async def test_a_nautilus_like_client_reconnects_with_ids_from_one_and_its_old_scope(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """On reconnect NautilusTrader sends the previous answer's whole scope and restarts its ids."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway = keeper.gateways["main"]
    assert gateway.port is not None
    async with connect(gateway.port) as first:
        granted = await first.auth(scope="session:nautilus-execution")
    async with connect(gateway.port) as again:
        regranted = await again.auth(scope=granted["scope"])
        answer = await again.call("private/get_open_orders_by_currency", {"currency": "BTC"}, id=1)
    assert regranted["scope"] == granted["scope"] and answer["id"] == 1


class DeflateClient:
    """A client that offers permessage-deflate, as ccxt does, on wsproto over a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.extensions: list[str] | None = None  # negotiated, once accepted
        self.frames: list[dict[str, Any]] = []
        self._partial = ""

    async def handshake(self, host: str) -> None:
        offer = Request(host=host, target="/ws/api/v2", extensions=[PerMessageDeflate()])
        await self.stream.send_all(self.ws.send(offer))
        while self.extensions is None:
            for event in await self._events():
                if isinstance(event, AcceptConnection):
                    self.extensions = [e.name for e in event.extensions]

    async def send(self, method: str, params: dict[str, Any], id: Any) -> None:
        frame = json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        await self.stream.send_all(self.ws.send(TextMessage(data=frame)))

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            for event in await self._events():
                if isinstance(event, TextMessage):
                    self._partial += event.data
                    if event.message_finished:
                        self.frames.append(json.loads(self._partial))
                        self._partial = ""
                elif isinstance(event, CloseConnection):
                    raise AssertionError(f"closed: {event.code} {event.reason}")

    def answer(self, id: Any) -> dict[str, Any] | None:
        return next((f for f in self.frames if f.get("id") == id), None)

    def channel(self, name: str) -> list[Any]:
        return [
            f["params"]["data"]
            for f in self.frames
            if f.get("method") == "subscription" and f["params"]["channel"] == name
        ]

    async def _events(self) -> list[Any]:
        self.ws.receive_data(await self.stream.receive_some(65536) or None)
        return list(self.ws.events())


async def ccxt_like(port: int, key: LocalClient) -> DeflateClient:
    """ccxt pro's Deribit client: permessage-deflate offered, the millisecond timestamp as the
    nonce, integer ids, the ticker over public/subscribe, the portfolio of four currencies."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = DeflateClient(stream)
    await client.handshake(f"127.0.0.1:{port}")
    timestamp = int(time.time() * 1000)
    signature = sign(key.client_secret.reveal(), timestamp, str(timestamp), "")
    await client.send(
        "public/auth",
        {
            "grant_type": "client_signature",
            "client_id": key.client_id,
            "timestamp": timestamp,
            "signature": signature,
            "nonce": str(timestamp),
            "data": "",
        },
        id=1,
    )
    await client.send("public/subscribe", {"channels": ["ticker.BTC-PERPETUAL.100ms"]}, id=2)
    portfolio = [f"user.portfolio.{c}" for c in ("BTC", "ETH", "SOL", "USDC")]
    await client.send("private/subscribe", {"channels": portfolio}, id=3)
    await client.send(
        "private/get_open_orders_by_instrument", {"instrument_name": "BTC-PERPETUAL"}, id="four"
    )
    with trio.fail_after(30):
        await client.until(
            lambda: (
                all(client.answer(i) for i in (1, 2, 3, "four"))
                and len(client.channel("ticker.BTC-PERPETUAL.100ms")) >= 3
                and len(client.channel("user.portfolio.BTC")) >= 1
            )
        )
    return client


async def test_a_ccxt_like_client_with_permessage_deflate_never_sees_an_error(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, sim: Simulator
) -> None:
    """Any error answer is fatal to ccxt: there must be none, and the answers match Deribit's."""
    keeper = await run_keeper(nursery, gateway_account(sim))
    gateway: Gateway = keeper.gateways["main"]
    assert gateway.port is not None
    through = await ccxt_like(gateway.port, ENGINE)
    direct = await ccxt_like(sim_port(sim), DERIBIT_KEY)
    assert through.extensions == ["permessage-deflate"]
    assert not [f for f in through.frames if "error" in f]
    for request_id in (2, 3, "four"):
        mine, theirs = through.answer(request_id), direct.answer(request_id)
        assert mine is not None and theirs is not None
        assert mine["result"] == theirs["result"] and type(mine["id"]) is type(request_id)
    ticks = through.channel("ticker.BTC-PERPETUAL.100ms")
    assert shape(ticks[0]) == shape(direct.channel("ticker.BTC-PERPETUAL.100ms")[0])
    for stream in (through.stream, direct.stream):
        await trio.aclose_forcefully(stream)
