"""The simulator's HTTP API, end to end over loopback: the same port as its WebSocket.

A tiny h11 client speaks HTTP/1.1 here (keep-alive included), so these tests pin what a REST
client such as ccxt meets: Deribit's envelope without ``id``, status 400 for errors, per-request
auth by Bearer token or ``deri-hmac-sha256`` signature, WebSocket-only methods refused, and orders
that no Cancel On Disconnect ever cancels. Anything involving time runs on the autojump clock.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import h11
import pytest
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from deribit_keeper.protocol import MAX_FRAME_BYTES, ErrorCode, sign
from deribit_keeper.signatures import http_signature
from deribit_keeper.simulator import SimAccount, Simulator
from deribit_keeper.simulator.http import KEEPALIVE_IDLE_S
from deribit_keeper.simulator.server import HANDSHAKE_TIMEOUT_S

from .conftest import SIM_ACCOUNTS
from .test_simulator import API_PATH, Client, connect, handshake_status, port_of

MAIN = SIM_ACCOUNTS[0]
OTHER = SIM_ACCOUNTS[1]
BTC = "BTC-PERPETUAL"
RESTING_BUY = {"instrument_name": BTC, "amount": 10, "type": "limit", "price": 40000}


@dataclass
class Answer:
    """One HTTP answer as the client read it."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def frame(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def error(self) -> dict[str, Any]:
        assert self.status == 400, (self.status, self.body)
        error: dict[str, Any] = self.frame["error"]
        return error

    @property
    def result(self) -> Any:
        assert self.status == 200, (self.status, self.body)
        return self.frame["result"]


class Http:
    """HTTP/1.1 over one TCP connection the test owns, with h11: requests in turn, kept alive."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(
        self, method: str, target: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        fields = [("host", "127.0.0.1"), *(headers or {}).items()]
        if body or method == "POST":
            fields.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=fields))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        await self.stream.send_all(data + self.conn.send(h11.EndOfMessage()))

    async def receive(self) -> Answer:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = {k.decode(): v.decode() for k, v in response.headers}
        return Answer(response.status_code, headers, bytes(body))

    async def request(
        self, method: str, target: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        await self.send(method, target, body=body, headers=headers)
        return await self.receive()

    async def get(
        self, api_method: str, params: dict[str, Any] | None = None, **headers: str
    ) -> Answer:
        return await self.request("GET", target(api_method, params), headers=headers)

    async def post(self, path: str, document: Any, **headers: str) -> Answer:
        return await self.request("POST", path, body=json.dumps(document).encode(), headers=headers)

    async def signed_get(
        self,
        api_method: str,
        params: dict[str, Any] | None = None,
        *,
        account: SimAccount = MAIN,
        ts_ms: int | None = None,
        nonce: str | None = None,
        secret: str | None = None,
    ) -> Answer:
        """A GET signed as ccxt signs it: RequestData = GET, the URI, an empty body."""
        uri = target(api_method, params)
        ts = int(time.time() * 1000) if ts_ms is None else ts_ms
        nonce = secrets.token_hex(8) if nonce is None else nonce
        sig = http_signature(secret or account.client_secret, ts, nonce, "GET", uri, "")
        header = f"deri-hmac-sha256 id={account.client_id},ts={ts},sig={sig},nonce={nonce}"
        return await self.request("GET", uri, headers={"authorization": header})

    async def closed(self) -> bool:
        """Whether the server has closed its side (reads until EOF, or a reset)."""
        try:
            while data := await self.stream.receive_some(65536):
                self.conn.receive_data(data)
        except trio.BrokenResourceError:
            pass
        return True


def target(api_method: str, params: dict[str, Any] | None = None) -> str:
    query = urlencode(
        {k: str(v).lower() if isinstance(v, bool) else v for k, v in (params or {}).items()}
    )
    return f"/api/v2/{api_method}" + (f"?{query}" if query else "")


@asynccontextmanager
async def http(sim: Simulator) -> AsyncIterator[Http]:
    """An HTTP client on a TCP connection of its own, always closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    try:
        yield Http(stream)
    finally:
        await stream.aclose()


async def raw_exchange(sim: Simulator, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read everything until the server closes."""
    async with http(sim) as client:
        await client.stream.send_all(data)
        received = bytearray()
        try:
            while chunk := await client.stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
        return bytes(received)


async def bearer(client: Http, account: SimAccount = MAIN) -> str:
    params = {"grant_type": "client_credentials", "client_id": account.client_id}
    grant = await client.get("public/auth", {**params, "client_secret": account.client_secret})
    token: str = grant.result["access_token"]
    return token


async def ws_auth(ws: Client, account: SimAccount = MAIN) -> None:
    await ws.auth(account.client_id, account.client_secret)


# ---- the envelope ---------------------------------------------------------------------------


async def test_a_get_is_answered_with_deribits_envelope_and_no_id(sim: Simulator) -> None:
    """GET /api/v2/public/test: 200, application/json, result plus usIn/usOut/usDiff/testnet."""
    async with http(sim) as client:
        answer = await client.get("public/test")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    frame = answer.frame
    assert set(frame) == {"jsonrpc", "result", "usIn", "usOut", "usDiff", "testnet"}
    assert frame["result"] == {"version": "1.2.26"}
    assert frame["usDiff"] == frame["usOut"] - frame["usIn"] >= 0
    assert sim.http_requests == [("public/test", {})]
    assert sim.connections == []  # HTTP calls are not WebSocket connections


async def test_a_post_body_is_a_json_rpc_request_whose_id_is_echoed(sim: Simulator) -> None:
    """POST /api/v2 with an id echoes it; POST /api/v2/{method} with no method in the body calls
    the path's method; an error answer keeps the id too."""
    async with http(sim) as client:
        answer = await client.post(
            "/api/v2", {"jsonrpc": "2.0", "id": "c-7", "method": "public/test"}
        )
        by_path = await client.post(
            "/api/v2/public/get_instruments", {"params": {"currency": "ETH"}}
        )
        failed = await client.post(
            "/api/v2",
            {"id": 8, "method": "public/test", "params": {"expected_result": "exception"}},
        )
    assert (answer.status, answer.frame["id"]) == (200, "c-7")
    assert list(answer.frame)[:2] == ["jsonrpc", "id"]
    assert [i["instrument_name"] for i in by_path.result] == ["ETH-PERPETUAL"]
    assert "id" not in by_path.frame
    assert failed.error["code"] == ErrorCode.TEMPORARILY_UNAVAILABLE
    assert failed.frame["id"] == 8


async def test_several_requests_share_one_kept_alive_connection(sim: Simulator) -> None:
    """Keep-alive: GETs and POSTs in turn on one TCP connection, and two sent back to back."""
    async with http(sim) as client:
        for _ in range(3):
            assert (await client.get("public/test")).status == 200
        assert (await client.post("/api/v2", {"method": "public/get_time"})).status == 200
        await client.stream.send_all(
            b"GET /api/v2/public/test HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /api/v2/public/get_currencies HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        # h11's client cannot pipeline: a fresh one is told of each request as if it sent it.
        client.conn = h11.Connection(h11.CLIENT)
        answers = []
        for _ in range(2):
            client.conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.conn.send(h11.EndOfMessage())
            answers.append(await client.receive())
        first, second = answers
    assert first.result == {"version": "1.2.26"}
    assert [c["currency"] for c in second.result] == ["BTC", "ETH"]
    assert [m for m, _ in sim.http_requests][-2:] == ["public/test", "public/get_currencies"]


async def test_an_http_1_0_request_is_answered_and_the_connection_closed(sim: Simulator) -> None:
    """A client that cannot keep alive gets its answer, then the close."""
    received = await raw_exchange(sim, b"GET /api/v2/public/test HTTP/1.0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b'"testnet":true}')


# ---- authentication -------------------------------------------------------------------------


async def test_a_signed_request_acts_for_its_account(sim: Simulator) -> None:
    """deri-hmac-sha256 over GET, the URI with its query, and an empty body: the order is the
    signing account's, as ccxt signs it."""
    async with http(sim) as client:
        placed = await client.signed_get("private/buy", RESTING_BUY)
        mine = await client.signed_get("private/get_open_orders_by_currency", {"currency": "BTC"})
        theirs = await client.signed_get(
            "private/get_open_orders_by_currency", {"currency": "BTC"}, account=OTHER
        )
    order = placed.result["order"]
    assert (order["order_state"], order["price"], order["amount"]) == ("open", 40000, 10)
    assert [o["order_id"] for o in mine.result] == [order["order_id"]]
    assert theirs.result == []
    assert [o["order_id"] for o in sim.open_orders(MAIN.client_id)] == [order["order_id"]]


async def test_a_signed_post_covers_its_body(sim: Simulator) -> None:
    """A POST's signature covers its body: the same header over another body is refused."""
    body = json.dumps(
        {"method": "private/get_open_orders_by_currency", "params": {"currency": "BTC"}}
    )
    ts, nonce = int(time.time() * 1000), "post-nonce"
    sig = http_signature(MAIN.client_secret, ts, nonce, "POST", "/api/v2", body)
    header = {
        "authorization": f"deri-hmac-sha256 id={MAIN.client_id},ts={ts},sig={sig},nonce={nonce}"
    }
    async with http(sim) as client:
        good = await client.request("POST", "/api/v2", body=body.encode(), headers=header)
        tampered = body.replace("BTC", "ETH").encode()
        sig2 = http_signature(MAIN.client_secret, ts, "other", "POST", "/api/v2", body)
        header2 = {
            "authorization": header["authorization"].replace(sig, sig2).replace(nonce, "other")
        }
        bad = await client.request("POST", "/api/v2", body=tampered, headers=header2)
    assert good.result == []
    assert bad.error["code"] == ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"secret": "not-the-secret"}, ErrorCode.UNAUTHORIZED),
        ({"ts_ms": int(time.time() * 1000) - 3_600_000}, ErrorCode.UNAUTHORIZED),
        ({"ts_ms": int(time.time() * 1000) + 3_600_000}, ErrorCode.UNAUTHORIZED),
        (
            {"account": SimAccount("ghost", "ghost-id", "ghost-secret")},
            ErrorCode.INVALID_CREDENTIALS,
        ),
    ],
    ids=["bad-signature", "stale", "from-the-future", "unknown-client-id"],
)
async def test_a_bad_signature_is_refused_and_places_nothing(
    sim: Simulator, change: dict[str, Any], code: int
) -> None:
    """A wrong secret or a timestamp off by more than 5 s is 13009; an unknown id 13004."""
    async with http(sim) as client:
        answer = await client.signed_get("private/buy", RESTING_BUY, **change)
    assert answer.error["code"] == code
    assert "id" not in answer.frame
    assert sim.orders(MAIN.client_id) == []


async def test_a_nonce_is_good_once_over_http_and_websocket_alike(sim: Simulator) -> None:
    """A reused nonce is 13009, and the nonces of WebSocket auths and HTTP signatures are one
    table: a nonce spent on a WebSocket's public/auth cannot sign an HTTP request."""
    ts = int(time.time() * 1000)
    async with http(sim) as client, connect(sim) as ws:
        first = await client.signed_get(
            "private/get_open_orders_by_currency", {"currency": "BTC"}, ts_ms=ts, nonce="n-1"
        )
        again = await client.signed_get(
            "private/get_open_orders_by_currency", {"currency": "ETH"}, ts_ms=ts, nonce="n-1"
        )
        params = {"grant_type": "client_signature", "client_id": MAIN.client_id, "timestamp": ts}
        signature = sign(MAIN.client_secret, ts, "n-2")
        await ws.result("public/auth", {**params, "nonce": "n-2", "signature": signature})
        spent = await client.signed_get(
            "private/get_open_orders_by_currency", {"currency": "BTC"}, ts_ms=ts, nonce="n-2"
        )
    assert first.result == []
    assert again.error["code"] == ErrorCode.UNAUTHORIZED
    assert spent.error["code"] == ErrorCode.UNAUTHORIZED


async def test_a_bearer_token_from_either_transport_authenticates(sim: Simulator) -> None:
    """public/auth over HTTP issues tokens like over WebSocket; either token works as Bearer,
    and an unknown token is 13009."""
    async with http(sim) as client, connect(sim) as ws:
        http_token = await bearer(client)
        grant = await ws.auth(OTHER.client_id, OTHER.client_secret)
        by_http_token = await client.get(
            "private/buy", RESTING_BUY, authorization=f"Bearer {http_token}"
        )
        by_ws_token = await client.get(
            "private/get_open_orders_by_currency",
            {"currency": "BTC"},
            authorization=f"Bearer {grant['access_token']}",
        )
        unknown = await client.get("private/buy", RESTING_BUY, authorization="Bearer 1.nope.nope")
    assert http_token in sim.issued_tokens
    assert by_http_token.result["order"]["order_state"] == "open"
    assert by_ws_token.result == []  # the other account's token sees the other account's orders
    assert unknown.error["code"] == ErrorCode.UNAUTHORIZED
    assert len(sim.orders(MAIN.client_id)) == 1


@pytest.mark.parametrize("header", [None, "Basic abc", "deri-hmac-sha256 id=main-id", "Bearer"])
async def test_a_private_method_without_valid_auth_is_unauthorized(
    sim: Simulator, header: str | None
) -> None:
    """No header, another scheme or an unreadable one: 13009 with status 400."""
    headers = {} if header is None else {"authorization": header}
    async with http(sim) as client:
        answer = await client.get(
            "private/get_open_orders_by_currency", {"currency": "BTC"}, **headers
        )
    assert answer.error == {"code": 13009, "message": "unauthorized"}


async def test_a_public_method_ignores_the_authorization_header(sim: Simulator) -> None:
    """A public call answers whatever its header says, and spends no nonce."""
    async with http(sim) as client:
        answer = await client.get("public/test", authorization="Basic garbage")
    assert answer.status == 200


# ---- WebSocket-only methods -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("public/set_heartbeat", {"interval": 10}),
        ("public/disable_heartbeat", {}),
        ("public/subscribe", {}),
        ("private/subscribe", {}),
        ("public/unsubscribe", {}),
        ("private/unsubscribe_all", {}),
        ("private/logout", {}),
        ("private/enable_cancel_on_disconnect", {}),
        ("private/enable_cancel_on_disconnect", {"scope": "connection"}),
        ("private/disable_cancel_on_disconnect", {}),
        ("private/get_cancel_on_disconnect", {}),
    ],
)
async def test_websocket_only_methods_are_refused_over_http(
    sim: Simulator, method: str, params: dict[str, Any]
) -> None:
    """Heartbeats, subscriptions, logout and connection-scoped COD: -32601, even when signed."""
    async with http(sim) as client:
        answer = await client.signed_get(method, params)
    assert answer.error["code"] == ErrorCode.METHOD_NOT_FOUND
    assert sim.account_cod(MAIN.client_id) is False


async def test_account_scoped_cod_is_served_over_http(sim: Simulator) -> None:
    """COD with scope account is a stored setting, so HTTP may set and read it."""
    async with http(sim) as client:
        enabled = await client.signed_get(
            "private/enable_cancel_on_disconnect", {"scope": "account"}
        )
        read = await client.signed_get("private/get_cancel_on_disconnect", {"scope": "account"})
    assert enabled.result == "ok"
    assert read.result == {"scope": "account", "enabled": True}
    assert sim.account_cod(MAIN.client_id) is True


# ---- orders over HTTP and Cancel On Disconnect ----------------------------------------------


@pytest.mark.parametrize("abrupt", [False, True])
async def test_an_order_placed_over_http_survives_every_websocket_ending(
    sim: Simulator, abrupt: bool
) -> None:
    """COD cancels what a connection placed, never an HTTP order: not when the connection the
    HTTP client authenticated on ends, nor when every WebSocket of the account does."""
    sim.set_account_cod(MAIN.client_id, True)
    async with http(sim) as client:
        async with connect(sim) as ws:
            grant = await ws.auth(MAIN.client_id, MAIN.client_secret)
            token = grant["access_token"]  # the WebSocket's own token, used over HTTP
            ws_order = (await ws.result("private/buy", RESTING_BUY))["order"]
            http_order = (
                await client.get("private/buy", RESTING_BUY, authorization=f"Bearer {token}")
            ).result["order"]
            await sim.drop(sim.connections[0], abrupt=abrupt)
        signed_order = (await client.signed_get("private/buy", RESTING_BUY)).result["order"]
        async with connect(sim) as other:
            await ws_auth(other)
            await other.result("private/enable_cancel_on_disconnect")
        await sim.wait_for(lambda: all(not c.open for c in sim.connections))
    assert all(c.cod_fired for c in sim.connections)
    assert sim.connections[0].cod_cancelled == [ws_order["order_id"]]
    still_open = [o["order_id"] for o in sim.open_orders(MAIN.client_id)]
    assert still_open == [http_order["order_id"], signed_order["order_id"]]


async def test_http_orders_reach_the_accounts_websockets_on_user_orders(sim: Simulator) -> None:
    """An HTTP buy and cancel are sent on the account's user.orders channels, not on others'."""
    async with http(sim) as client, connect(sim) as ws, connect(sim) as stranger:
        await ws_auth(ws)
        await ws.result("private/subscribe", {"channels": [f"user.orders.{BTC}.raw"]})
        await ws_auth(stranger, OTHER)
        await stranger.result("private/subscribe", {"channels": [f"user.orders.{BTC}.raw"]})
        order = (await client.signed_get("private/buy", RESTING_BUY)).result["order"]
        placed = await ws.recv()
        cancelled = (
            await client.signed_get("private/cancel", {"order_id": order["order_id"]})
        ).result
        gone = await ws.recv()
        await stranger.result("public/test")  # anything queued for it would have come first
    assert placed["params"]["channel"] == f"user.orders.{BTC}.raw"
    assert placed["params"]["data"]["order_id"] == order["order_id"]
    assert placed["params"]["data"]["order_state"] == "open"
    assert cancelled["order_state"] == gone["params"]["data"]["order_state"] == "cancelled"
    assert stranger.notifications == []


# ---- faults ---------------------------------------------------------------------------------


async def test_fail_next_applies_to_http_calls_and_may_close_the_connection(sim: Simulator) -> None:
    """An armed failure answers the next HTTP call with its code; with close_after the TCP
    connection is closed after that answer."""
    sim.fail_next("public/test", ErrorCode.TEMPORARILY_UNAVAILABLE)
    sim.fail_next("public/get_time", ErrorCode.TOO_MANY_REQUESTS, close_after=True)
    async with http(sim) as client:
        failed = await client.get("public/test")
        passed = await client.get("public/test")
        limited = await client.get("public/get_time")
        assert await client.closed()
    assert failed.error["code"] == ErrorCode.TEMPORARILY_UNAVAILABLE
    assert passed.status == 200
    assert limited.error["code"] == ErrorCode.TOO_MANY_REQUESTS
    assert limited.headers["connection"] == "close"


async def test_delay_next_delays_an_http_answer(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """A delayed HTTP call is answered only after the delay."""
    sim.delay_next("public/test", 30.0)
    async with http(sim) as client:
        start = trio.current_time()
        answer = await client.get("public/test")
    assert answer.status == 200
    assert trio.current_time() - start >= 30.0


# ---- bad input never crashes the simulator --------------------------------------------------


async def still_serves(sim: Simulator) -> None:
    """The simulator answers HTTP and WebSocket clients after whatever a test threw at it."""
    async with http(sim) as client:
        assert (await client.get("public/test")).status == 200
    async with connect(sim) as ws:
        assert await ws.result("public/test") == {"version": "1.2.26"}


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\x01\x02garbage\r\n\r\n", b"400"),
        (b"GET /api/v2/public/test HTTP/1.1\r\nbad header line\r\n\r\n", b"400"),
        (
            b"GET /api/v2/public/test HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n",
            b"431",
        ),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"431"),
    ],
    ids=["garbage", "bad-header", "huge-header", "huge-request-line"],
)
async def test_what_is_not_http_is_refused_and_the_connection_closed(
    sim: Simulator, data: bytes, status: bytes
) -> None:
    """Garbage or a head over 16 kB gets h11's status (400, 431), then the close."""
    received = await raw_exchange(sim, data)
    assert received.startswith(b"HTTP/1.1 " + status)
    await still_serves(sim)


async def test_a_body_over_32_kB_is_request_too_large_and_ends_the_connection(
    sim: Simulator,
) -> None:
    """A body above 32 kB is -32600 without id (as Deribit), whether sent or only announced."""
    big = json.dumps({"id": 1, "method": "public/test", "pad": "a" * MAX_FRAME_BYTES}).encode()
    async with http(sim) as client:
        sent = await client.request("POST", "/api/v2", body=big)
        assert await client.closed()
    announced = await raw_exchange(
        sim, b"POST /api/v2 HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999999\r\n\r\n{"
    )
    for frame in (sent.frame, json.loads(announced.split(b"\r\n\r\n", 1)[1])):
        assert frame["error"]["code"] == ErrorCode.REQUEST_TOO_LARGE
        assert "id" not in frame
    assert sent.headers["connection"] == "close"
    assert sim.http_requests == []
    await still_serves(sim)


async def test_a_chunked_body_over_32_kB_is_cut_off_too(sim: Simulator) -> None:
    """Without a Content-Length the limit holds as the chunks arrive."""
    chunk = b"a" * 8192
    head = b"POST /api/v2/public/test HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    data = head + (b"2000\r\n" + chunk + b"\r\n") * 5 + b"0\r\n\r\n"
    received = await raw_exchange(sim, data)
    assert received.startswith(b"HTTP/1.1 400")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == -32600
    await still_serves(sim)


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"{nope", ErrorCode.PARSE_ERROR), (b"[1]", ErrorCode.MISSING_PARAMS)],
)
async def test_a_post_body_that_is_no_request_is_answered_400(
    sim: Simulator, body: bytes, code: int
) -> None:
    """Not JSON is -32700; JSON that is no request -32000; the connection stays usable."""
    async with http(sim) as client:
        answer = await client.request("POST", "/api/v2", body=body)
        after = await client.get("public/test")
    assert answer.error["code"] == code
    assert after.status == 200


async def test_other_paths_are_404_and_other_methods_405(sim: Simulator) -> None:
    """Only /api/v2 is the API; only GET and POST read it. The connection stays usable."""
    async with http(sim) as client:
        elsewhere = await client.request("GET", "/ws/api/v2")
        root = await client.request("GET", "/")
        put = await client.request("PUT", "/api/v2/public/test", body=b"{}")
        head = await client.request("HEAD", "/api/v2/public/test")
        unknown = await client.get("public/no_such_method")
    assert (elsewhere.status, root.status) == (404, 404)
    assert (put.status, put.headers["allow"]) == (405, "GET, POST")
    assert (head.status, head.body) == (405, b"")
    assert unknown.error["code"] == ErrorCode.METHOD_NOT_FOUND


async def test_a_request_that_never_finishes_is_dropped(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """Half a head, or a head and half its body, is dropped unanswered after the handshake
    timeout; an idle kept-alive connection after KEEPALIVE_IDLE_S."""
    for partial in (
        b"GET /api/v2/public/te",
        b"POST /api/v2 HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{",
    ):
        async with http(sim) as client:
            start = trio.current_time()
            await client.stream.send_all(partial)
            assert await client.stream.receive_some(100) == b""
            assert HANDSHAKE_TIMEOUT_S <= trio.current_time() - start < HANDSHAKE_TIMEOUT_S + 1
    async with http(sim) as client:
        await client.get("public/test")
        start = trio.current_time()
        assert await client.stream.receive_some(100) == b""
        assert KEEPALIVE_IDLE_S <= trio.current_time() - start < KEEPALIVE_IDLE_S + 1
    await still_serves(sim)


# ---- WebSockets on the same port ------------------------------------------------------------


async def test_a_websocket_may_upgrade_a_kept_alive_http_connection(sim: Simulator) -> None:
    """aiohttp (so ccxt.pro) opens its WebSocket on a connection its REST calls used: the
    upgrade after HTTP requests gets a WebSocket like a fresh connection's."""
    async with http(sim) as client:
        assert (await client.get("public/test")).status == 200
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, client.stream, "127.0.0.1", API_PATH)
            ws_client = Client(ws)
            await ws_auth(ws_client)
            assert await ws_client.result("private/enable_cancel_on_disconnect") == "ok"
            await ws.aclose()
            nursery.cancel_scope.cancel()
    await sim.wait_for(lambda: len(sim.connections) == 1 and not sim.connections[0].open)
    assert sim.connections[0].client_id == MAIN.client_id


async def test_websocket_handshake_refusals_still_work(nursery: trio.Nursery) -> None:
    """refuse_handshakes, a WebSocket path other than /ws/api/v2 and the per-IP limit still
    refuse handshakes; HTTP requests are not counted against the limit."""
    sim = Simulator(list(SIM_ACCOUNTS), max_connections_per_ip=1)
    await nursery.start(sim.serve, 0)
    sim.refuse_handshakes(1, 503)
    assert await handshake_status(sim) == 503
    assert await handshake_status(sim, "/elsewhere") == 404
    async with connect(sim), http(sim) as client:
        assert (await client.get("public/test")).status == 200  # HTTP is not refused at the limit
        assert await handshake_status(sim) == 429
    assert sim.rejected_handshakes == [503, 404, 429]
