"""What the gateway tests share: a keeper with gateways on a simulator, and a plain local client.

The client is deliberately dumb, like a firm's own: it sends frames with the ids it is told,
keeps every answer and notification, and answers heartbeats only if asked to. Tests read what it
received, and what the simulator saw, never the gateway's insides.
"""

from __future__ import annotations

import dataclasses
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from deribit_keeper.config import AccountConfig, GatewayConfig, LocalClient
from deribit_keeper.gateway import Gateway
from deribit_keeper.protocol import sign
from deribit_keeper.session import SessionState
from deribit_keeper.signatures import http_signature
from deribit_keeper.simulator import SimConnection, Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import ENGINE, RESEARCH, account_config, keeper_config


def gateway_config(**overrides: Any) -> GatewayConfig:
    """A gateway on any free loopback port, for the ENGINE and RESEARCH local clients."""
    config = GatewayConfig(host="127.0.0.1", port=0, clients=(ENGINE, RESEARCH))
    return dataclasses.replace(config, **overrides)


def gateway_account(
    sim: Simulator, name: str = "main", gateway: GatewayConfig | None = None, **overrides: Any
) -> AccountConfig:
    account = account_config(sim, name, **overrides)
    return dataclasses.replace(account, gateway=gateway or gateway_config())


async def until(keeper: Keeper, predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds: checked after every session or gateway event."""
    changed = trio.Event()

    def poke(*_: object) -> None:
        changed.set()

    watched: set[int] = set()
    while not predicate():
        for session in keeper.sessions.values():
            if id(session) not in watched:
                watched.add(id(session))
                session.watch(poke)
        for gateway in keeper.gateways.values():
            if id(gateway) not in watched:
                watched.add(id(gateway))
                gateway.watch(poke)
        if predicate():
            return
        # A gateway the keeper starts later (a reload's) is not watched yet when the wait
        # begins: look again after a virtual second too. autojump makes that free.
        with trio.move_on_after(1):
            await changed.wait()
        changed = trio.Event()


def ready_and_listening(keeper: Keeper) -> Callable[[], bool]:
    def check() -> bool:
        sessions = all(s.state is SessionState.READY for s in keeper.sessions.values())
        return sessions and all(g.port is not None for g in keeper.gateways.values())

    return check


async def run_keeper(
    nursery: trio.Nursery, *accounts: AccountConfig, signals: bool = False
) -> Keeper:
    """A running Keeper for ``accounts``, once every session is ready and every gateway listens."""
    keeper = Keeper(keeper_config(*accounts), rng=random.Random(7))
    await nursery.start(partial(keeper.run, handle_signals=signals))
    await until(keeper, ready_and_listening(keeper))
    return keeper


def upstream(sim: Simulator, account: str = "main") -> SimConnection:
    """The account's open connection on the simulator: the keeper's protected upstream link."""
    [link] = [c for c in sim.connections if c.client_id == f"{account}-id" and c.open]
    return link


class Client:
    """One local link, driven by a test."""

    def __init__(
        self, ws: WebSocketConnection, stream: trio.SocketStream, *, answer_heartbeats: bool
    ) -> None:
        self.ws = ws
        self._stream = stream
        self.answer_heartbeats = answer_heartbeats
        self.frames: list[dict[str, Any]] = []  # everything received, in order
        self.test_requests = 0
        self.closed: CloseReason | None = None
        self._changed = trio.Event()
        self._ids = 1000

    async def read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                self.frames.append(frame)
                if frame.get("method") == "heartbeat":
                    self.test_requests += 1
                    if self.answer_heartbeats:
                        await self.send("public/test", id=self.next_id())
                self._wake()
        except ConnectionClosed as closed:
            self.closed = closed.reason
            self._wake()

    async def abort(self) -> None:
        """End the link as a crashed engine would: the TCP connection closed, no close frame."""
        await trio.aclose_forcefully(self._stream)

    async def until_closed(self) -> CloseReason:
        await self.wait_for(lambda: self.closed is not None)
        assert self.closed is not None
        return self.closed

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def send(self, method: str, params: dict[str, Any] | None = None, *, id: Any) -> None:
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.ws.send_message(json.dumps(frame))

    def answer(self, id: Any) -> dict[str, Any] | None:
        """The answer with this id (and the same JSON type), if it has come."""
        for frame in self.frames:
            if "id" in frame and frame["id"] == id and type(frame["id"]) is type(id):
                return frame
        return None

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, id: Any = None
    ) -> dict[str, Any]:
        """Send a request and return its whole answer (``result`` or ``error``, envelope)."""
        request_id = self.next_id() if id is None else id
        seen = len([f for f in self.frames if f.get("id") == request_id])
        await self.send(method, params, id=request_id)
        matching: list[dict[str, Any]] = []

        def answered() -> bool:
            matching[:] = [f for f in self.frames if "id" in f and f["id"] == request_id]
            return len(matching) > seen or self.closed is not None

        await self.wait_for(answered)
        assert len(matching) > seen, f"{method}: link closed {self.closed} before an answer"
        return matching[-1]

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = await self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    async def auth(self, client: LocalClient = ENGINE, **extra: Any) -> dict[str, Any]:
        """``public/auth`` with ``client_signature``, as NautilusTrader and ccxt do."""
        timestamp, nonce = int(time.time() * 1000), secrets.token_hex(8)
        params = {
            "grant_type": "client_signature",
            "client_id": client.client_id,
            "timestamp": timestamp,
            "nonce": nonce,
            "data": "",
            "signature": sign(client.client_secret.reveal(), timestamp, nonce, ""),
            **extra,
        }
        result: dict[str, Any] = await self.result("public/auth", params)
        return result

    def notifications(self, channel: str) -> list[Any]:
        return [
            f["params"]["data"]
            for f in self.frames
            if f.get("method") == "subscription" and f["params"]["channel"] == channel
        ]

    async def buy(self, price: float = 40000.0, **extra: Any) -> dict[str, Any]:
        """A resting limit buy on BTC-PERPETUAL; the order object."""
        params = {"instrument_name": "BTC-PERPETUAL", "amount": 10, "price": price, **extra}
        result: dict[str, Any] = await self.result("private/buy", params)
        order: dict[str, Any] = result["order"]
        return order


@asynccontextmanager
async def local_client(
    gateway: Gateway, *, answer_heartbeats: bool = True
) -> AsyncIterator[Client]:
    """A connected local client with its reader running; closed politely on the way out."""
    assert gateway.port is not None
    async with connect(gateway.port, answer_heartbeats=answer_heartbeats) as client:
        yield client


@asynccontextmanager
async def connect(
    port: int, *, answer_heartbeats: bool = True, path: str = "/ws/api/v2"
) -> AsyncIterator[Client]:
    """A client of whatever serves Deribit's API on ``port``: a gateway, or the simulator."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", path)
            client = Client(ws, stream, answer_heartbeats=answer_heartbeats)
            nursery.start_soon(client.read)
            yield client
            with trio.move_on_after(2):
                await ws.aclose()
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def refused_with(gateway: Gateway, path: str = "/ws/api/v2") -> int | None:
    """The HTTP status a WebSocket handshake on ``path`` is refused with, or None if accepted."""
    assert gateway.port is not None
    status: int | None = None
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
            await ws.aclose()
    except* ConnectionRejected as refused:
        rejection = refused.exceptions[0]
        assert isinstance(rejection, ConnectionRejected)
        status = rejection.status_code
    finally:
        await trio.aclose_forcefully(stream)
    return status


AUTHORIZED = (ENGINE, RESEARCH)
__all__ = ["AUTHORIZED", "ENGINE", "RESEARCH", "Client", "local_client", "run_keeper"]


# ---- Deribit's HTTP API, as a REST client speaks it ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: dict[str, Any]


def hmac_header(
    client: LocalClient,
    method: str,
    uri: str,
    body: str = "",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> str:
    """``Authorization: deri-hmac-sha256 ...`` for one request, as ccxt builds it."""
    ts = int(time.time() * 1000) if timestamp is None else timestamp
    nonce = secrets.token_hex(8) if nonce is None else nonce
    sig = http_signature(client.client_secret.reveal(), ts, nonce, method, uri, body)
    return f"deri-hmac-sha256 id={client.client_id},ts={ts},sig={sig},nonce={nonce}"


async def http_call(
    port: int,
    method: str,
    target: str,
    *,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
) -> HttpAnswer:
    """One HTTP/1.1 request on a fresh connection (h11, hypercorn's own parser) and its JSON."""
    conn = h11.Connection(h11.CLIENT)
    head = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *headers]
    if method == "POST" or body:
        head.append(("Content-Length", str(len(body))))
        head.append(("Content-Type", "application/json"))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(30):
        try:
            out = conn.send(h11.Request(method=method, target=target, headers=head))
            out += conn.send(h11.Data(data=body)) if body else b""
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        finally:
            await trio.aclose_forcefully(stream)
    return HttpAnswer(status, json.loads(b"".join(chunks)))


async def http_private(
    port: int, method: str, query: str = "", *, client: LocalClient = ENGINE
) -> HttpAnswer:
    """``GET /api/v2/{method}?query`` signed with ``client``'s local secret."""
    uri = f"/api/v2/{method}" + (f"?{query}" if query else "")
    auth = hmac_header(client, "GET", uri)
    return await http_call(port, "GET", uri, headers=(("Authorization", auth),))
