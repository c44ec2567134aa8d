"""Tests of the Deribit simulator: every method, error path and fault, over loopback sockets.

Clients here speak raw JSON through trio-websocket, so these tests pin the wire format the keeper
will meet, independently of the keeper's own RPC layer. Anything involving time runs on Trio's
autojump clock, with a wall clock that moves with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from deribit_keeper.protocol import API_VERSION, MAX_FRAME_BYTES, sign
from deribit_keeper.simulator import SimAccount, SimConnection, Simulator, load_accounts

BASE_WALL = 1_700_000_000.0
ACCOUNTS = [
    SimAccount(name="main", client_id="id1", client_secret="s3cret"),
    SimAccount(name="other", client_id="id2", client_secret="other-secret"),
]
API_PATH = "/ws/api/v2"
TOKEN_SHAPE = re.compile(r"^\d{13}\.[\w-]{8}\.[\w-]{16,}$")
TEST_REQUEST = {"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}}
PRIVATE_METHODS = [
    "private/enable_cancel_on_disconnect",
    "private/disable_cancel_on_disconnect",
    "private/get_cancel_on_disconnect",
    "private/logout",
]


def wall() -> float:
    """A wall clock that moves with Trio's clock, so autojump moves it too."""
    return BASE_WALL + trio.current_time()


class Client:
    """A bare JSON-RPC client: numbered ids, raw frames, notifications set aside."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.notifications: list[dict[str, Any]] = []
        self._last_id = 0

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, request_id: Any = None
    ) -> Any:
        if request_id is None:
            self._last_id += 1
            request_id = self._last_id
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.ws.send_message(json.dumps(frame))
        return request_id

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.ws.get_message())
        return frame

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = await self.send(method, params)
        while True:
            frame = await self.recv()
            if "method" in frame:
                self.notifications.append(frame)
            elif frame.get("id") == request_id:
                return frame

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        frame = await self.call(method, params)
        assert "result" in frame, frame
        return frame["result"]

    async def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        frame = await self.call(method, params)
        assert "error" in frame, frame
        error: dict[str, Any] = frame["error"]
        return error

    async def auth(self, client_id: str = "id1", secret: str = "s3cret") -> dict[str, Any]:
        params = {"grant_type": "client_credentials", "client_id": client_id}
        result: dict[str, Any] = await self.result(
            "public/auth", {**params, "client_secret": secret}
        )
        return result


@asynccontextmanager
async def connect(sim: Simulator) -> AsyncIterator[Client]:
    """A WebSocket client on a TCP stream the test owns and always closes.

    trio-websocket 0.12's client never closes its socket when the server starts the close (its
    aclose returns early once a close reason is set), which pytest reports as a ResourceWarning.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port_of(sim)}", API_PATH)
            try:
                yield Client(ws)
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


def port_of(sim: Simulator) -> int:
    return int(sim.url.rsplit(":", 1)[1].split("/", 1)[0])


async def handshake_status(sim: Simulator, path: str = API_PATH) -> int | None:
    """The HTTP status a handshake is refused with, or None when it is accepted.

    trio-websocket's client leaves its socket open when refused, so the test owns the stream.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    statuses: list[int] = []
    try:
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
                await ws.aclose()
        except* ConnectionRejected as group:
            statuses = [
                e.status_code for e in group.exceptions if isinstance(e, ConnectionRejected)
            ]
    finally:
        await stream.aclose()
    return statuses[0] if statuses else None


async def start(nursery: trio.Nursery, **kwargs: Any) -> Simulator:
    simulator = Simulator(ACCOUNTS, wall_clock=wall, **kwargs)
    await nursery.start(simulator.serve, 0)
    return simulator


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Simulator:
    return await start(nursery, token_ttl_s=900.0)


def assert_envelope(frame: dict[str, Any], request_id: Any) -> None:
    assert frame["jsonrpc"] == "2.0"
    assert frame["id"] == request_id
    assert frame["testnet"] is True
    assert isinstance(frame["usIn"], int)
    assert frame["usOut"] >= frame["usIn"]
    assert frame["usDiff"] == frame["usOut"] - frame["usIn"]


def signature_params(
    *, secret: str = "s3cret", nonce: str = "n-1", offset_ms: int = 0, data: str = ""
) -> dict[str, Any]:
    timestamp = int(wall() * 1000) + offset_ms
    return {
        "grant_type": "client_signature",
        "client_id": "id1",
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": sign(secret, timestamp, nonce, data),
        "data": data,
    }


# Envelopes and malformed frames ---------------------------------------------------------------


async def test_hello_answers_version_in_full_envelope(sim: Simulator) -> None:
    """public/hello answers the API version with usIn/usOut from the wall clock and testnet."""
    async with connect(sim) as client:
        request_id = await client.send(
            "public/hello", {"client_name": "tests", "client_version": "1"}
        )
        frame = await client.recv()
    assert frame["result"] == {"version": API_VERSION}
    assert_envelope(frame, request_id)
    assert abs(frame["usIn"] / 1e6 - wall()) < 5


async def test_string_id_is_echoed_as_sent(sim: Simulator) -> None:
    """A string id comes back exactly as sent."""
    async with connect(sim) as client:
        await client.send("public/test", request_id="req-7")
        frame = await client.recv()
    assert_envelope(frame, "req-7")


async def test_public_test_answers_version(sim: Simulator) -> None:
    """public/test answers the API version."""
    async with connect(sim) as client:
        assert await client.result("public/test") == {"version": API_VERSION}
    assert sim.connections[0].methods() == ["public/test"]


async def test_public_test_expected_exception_answers_an_error(sim: Simulator) -> None:
    """public/test with expected_result "exception" answers 13028 in the usual envelope."""
    async with connect(sim) as client:
        request_id = await client.send("public/test", {"expected_result": "exception"})
        frame = await client.recv()
    assert frame["error"] == {"code": 13028, "message": "temporarily_unavailable"}
    assert_envelope(frame, request_id)


async def test_non_json_frame_is_a_parse_error_without_id(sim: Simulator) -> None:
    """A frame that is not JSON gets -32700 with no id key, and the connection lives on."""
    async with connect(sim) as client:
        await client.ws.send_message("{not json")
        frame = await client.recv()
        assert await client.result("public/test") == {"version": API_VERSION}
    assert frame["error"] == {"code": -32700, "message": "Parse error"}
    assert "id" not in frame
    assert frame["testnet"] is True
    assert sim.connections[0].methods() == ["public/test"]


@pytest.mark.parametrize("text", ["[1, 2]", "42", '{"id": 7, "params": {}}', '{"method": 5}'])
async def test_json_that_is_not_a_request_gets_error_without_id(sim: Simulator, text: str) -> None:
    """Valid JSON that is not a request object gets -32000 with no id key."""
    async with connect(sim) as client:
        await client.ws.send_message(text)
        frame = await client.recv()
    assert frame["error"] == {"code": -32000, "message": "Missing params"}
    assert "id" not in frame
    assert sim.connections[0].requests == []


async def test_oversized_frame_is_refused_without_id(sim: Simulator) -> None:
    """A frame larger than MAX_FRAME_BYTES gets -32600 with no id and is not recorded."""
    padding = "x" * MAX_FRAME_BYTES
    async with connect(sim) as client:
        await client.send("public/test", {"padding": padding})
        frame = await client.recv()
    assert frame["error"] == {"code": -32600, "message": "request entity too large"}
    assert "id" not in frame
    assert sim.connections[0].requests == []


async def test_unknown_method_is_method_not_found(sim: Simulator) -> None:
    """An unknown method gets -32601 and is still recorded as a request."""
    async with connect(sim) as client:
        request_id = await client.send("public/nonsense", {"a": 1})
        frame = await client.recv()
    assert frame["error"] == {"code": -32601, "message": "Method not found"}
    assert_envelope(frame, request_id)
    assert sim.connections[0].requests == [("public/nonsense", {"a": 1})]


async def test_missing_param_is_missing_params(sim: Simulator) -> None:
    """A required param that is absent gets -32000 with code and message only."""
    async with connect(sim) as client:
        error = await client.error("public/hello", {"client_name": "tests"})
    assert error == {"code": -32000, "message": "Missing params"}


async def test_wrong_param_type_is_invalid_params_naming_it(sim: Simulator) -> None:
    """A param of the wrong type gets -32602 whose data names the param."""
    async with connect(sim) as client:
        error = await client.error("public/hello", {"client_name": 5, "client_version": "1"})
    assert error["code"] == -32602
    assert error["message"] == "Invalid params"
    assert error["data"]["param"] == "client_name"
    assert isinstance(error["data"]["reason"], str)


async def test_params_that_are_not_an_object_are_invalid_params(sim: Simulator) -> None:
    """A params member that is not an object gets -32602 naming "params", with the id echoed."""
    async with connect(sim) as client:
        await client.ws.send_message(
            '{"jsonrpc": "2.0", "id": 3, "method": "public/test", "params": [1]}'
        )
        frame = await client.recv()
    assert frame["error"]["code"] == -32602
    assert frame["error"]["data"]["param"] == "params"
    assert frame["id"] == 3


# Authentication -----------------------------------------------------------------------------


async def test_client_credentials_auth_answers_tokens(sim: Simulator) -> None:
    """client_credentials auth answers Deribit-shaped tokens and authenticates the connection."""
    async with connect(sim) as client:
        result = await client.auth()
    assert set(result) == {
        "access_token",
        "expires_in",
        "refresh_token",
        "scope",
        "token_type",
        "enabled_features",
    }
    assert result["expires_in"] == 900
    assert result["scope"] == "connection mainaccount"
    assert result["token_type"] == "bearer"
    assert result["enabled_features"] == []
    assert TOKEN_SHAPE.match(result["access_token"])
    assert TOKEN_SHAPE.match(result["refresh_token"])
    assert result["access_token"] != result["refresh_token"]
    assert sim.issued_tokens == [result["access_token"], result["refresh_token"]]
    assert sim.connections[0].client_id == "id1"


@pytest.mark.parametrize(("client_id", "secret"), [("id1", "wrong"), ("nobody", "s3cret")])
async def test_bad_credentials_are_invalid_credentials(
    sim: Simulator, client_id: str, secret: str
) -> None:
    """A wrong secret or an unknown client id gets 13004 and leaves the connection anonymous."""
    async with connect(sim) as client:
        error = await client.error(
            "public/auth",
            {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        )
    assert error == {"code": 13004, "message": "invalid_credentials"}
    assert sim.connections[0].client_id is None


async def test_unknown_grant_type_is_invalid_params(sim: Simulator) -> None:
    """An unknown grant_type gets -32602 naming grant_type."""
    async with connect(sim) as client:
        error = await client.error("public/auth", {"grant_type": "password"})
    assert error["code"] == -32602
    assert error["data"]["param"] == "grant_type"


async def test_signature_auth_succeeds(sim: Simulator) -> None:
    """client_signature auth with a correct HMAC, with and without data, authenticates."""
    async with connect(sim) as client:
        result = await client.result("public/auth", signature_params(nonce="a"))
        assert TOKEN_SHAPE.match(result["access_token"])
        await client.result("public/auth", signature_params(nonce="b", data="extra"))
    assert sim.connections[0].client_id == "id1"


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"secret": "not-the-secret"}, id="bad-signature"),
        pytest.param({"offset_ms": -6000}, id="stale-timestamp"),
        pytest.param({"offset_ms": 6000}, id="future-timestamp"),
    ],
)
async def test_signature_auth_failures_are_unauthorized(
    sim: Simulator, params: dict[str, Any]
) -> None:
    """A signature that does not verify, or a timestamp more than 5 s off, gets 13009."""
    async with connect(sim) as client:
        error = await client.error("public/auth", signature_params(**params))
    assert error == {"code": 13009, "message": "unauthorized"}
    assert sim.connections[0].client_id is None


async def test_reused_nonce_is_unauthorized(sim: Simulator) -> None:
    """A nonce already used by this client gets 13009, even from another connection."""
    async with connect(sim) as client:
        await client.result("public/auth", signature_params(nonce="once"))
    async with connect(sim) as client:
        error = await client.error("public/auth", signature_params(nonce="once"))
    assert error == {"code": 13009, "message": "unauthorized"}


async def test_signature_for_unknown_client_is_invalid_credentials(sim: Simulator) -> None:
    """client_signature naming an unknown client id gets 13004."""
    async with connect(sim) as client:
        error = await client.error("public/auth", {**signature_params(), "client_id": "nobody"})
    assert error["code"] == 13004


async def test_refresh_issues_new_tokens_and_revokes_the_old_refresh(sim: Simulator) -> None:
    """A refresh answers a new pair; the refresh token it used then gets 13009."""
    async with connect(sim) as client:
        first = await client.auth()
        refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        second = await client.result("public/auth", refresh)
        assert second["access_token"] != first["access_token"]
        assert second["refresh_token"] != first["refresh_token"]
        error = await client.error("public/auth", refresh)
    assert error == {"code": 13009, "message": "unauthorized"}
    assert len(sim.issued_tokens) == 4


async def test_expired_refresh_token_is_unauthorized(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """A refresh token older than token_ttl_s gets 13009."""
    async with connect(sim) as client:
        refresh_token = (await client.auth())["refresh_token"]
    await trio.sleep(901)
    async with connect(sim) as client:
        error = await client.error(
            "public/auth", {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )
    assert error["code"] == 13009


@pytest.mark.parametrize("method", PRIVATE_METHODS)
async def test_private_methods_need_auth(sim: Simulator, method: str) -> None:
    """Every private method on an unauthenticated connection gets 13009, and nothing closes."""
    async with connect(sim) as client:
        error = await client.error(method)
        assert await client.result("public/test") == {"version": API_VERSION}
    assert error == {"code": 13009, "message": "unauthorized"}
    assert sim.connections[0].closed_by == "client"


async def test_access_token_expires_after_ttl(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Private methods get 13009 once the connection's access token is token_ttl_s old."""
    sim = await start(nursery, token_ttl_s=100.0)
    async with connect(sim) as client:
        assert (await client.auth())["expires_in"] == 100
        await trio.sleep(99)
        await client.result("private/get_cancel_on_disconnect")
        await trio.sleep(1)
        error = await client.error("private/get_cancel_on_disconnect")
        assert error["code"] == 13009
        await client.auth()
        await client.result("private/get_cancel_on_disconnect")


async def test_invalid_explicit_access_token_is_unauthorized(sim: Simulator) -> None:
    """A private request carrying an unknown access_token gets 13009 even on an authed link."""
    async with connect(sim) as client:
        await client.auth()
        error = await client.error("private/get_cancel_on_disconnect", {"access_token": "x.y.z"})
    assert error["code"] == 13009


# Heartbeats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [9.5, "10", True])
async def test_set_heartbeat_refuses_bad_interval(sim: Simulator, interval: Any) -> None:
    """An interval below HEARTBEAT_MIN_S or not a number gets -32602 naming interval."""
    async with connect(sim) as client:
        error = await client.error("public/set_heartbeat", {"interval": interval})
    assert error["code"] == -32602
    assert error["data"]["param"] == "interval"


async def test_heartbeat_sends_test_requests_and_closes_when_one_is_unanswered(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """A test_request comes every interval; one left unanswered closes the link (COD fires)."""
    async with connect(sim) as client:
        await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
        assert await client.result("public/set_heartbeat", {"interval": 10}) == "ok"
        started = trio.current_time()
        assert await client.recv() == TEST_REQUEST
        assert trio.current_time() == pytest.approx(started + 10)
        await client.result("public/test")
        assert await client.recv() == TEST_REQUEST
        assert trio.current_time() == pytest.approx(started + 20)
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert trio.current_time() == pytest.approx(started + 30)
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1000
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert conn.heartbeat_interval == 10
    assert (conn.test_requests_sent, conn.test_requests_answered) == (2, 1)
    assert (conn.closed_by, conn.close_code, conn.abrupt) == ("server", 1000, False)
    assert conn.cod_fired


async def test_disable_heartbeat_stops_test_requests(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """After public/disable_heartbeat no test_request comes and nothing closes."""
    async with connect(sim) as client:
        await client.result("public/set_heartbeat", {"interval": 10})
        assert await client.result("public/disable_heartbeat") == "ok"
        with trio.move_on_after(100):
            await client.recv()
            pytest.fail("a frame arrived after disable_heartbeat")
    conn = sim.connections[0]
    assert (conn.heartbeat_interval, conn.test_requests_sent) == (None, 0)
    assert conn.closed_by == "client"


# Cancel On Disconnect -------------------------------------------------------------------------


async def test_cod_connection_scope(sim: Simulator) -> None:
    """Scope connection turns this connection's COD on and off; the account setting stays."""
    async with connect(sim) as client:
        await client.auth()
        get = "private/get_cancel_on_disconnect"
        assert await client.result(get) == {"scope": "connection", "enabled": False}
        assert await client.result("private/enable_cancel_on_disconnect") == "ok"
        assert await client.result(get, {"scope": "connection"}) == {
            "scope": "connection",
            "enabled": True,
        }
        assert sim.connections[0].cod_enabled
        assert await client.result(get, {"scope": "account"}) == {
            "scope": "account",
            "enabled": False,
        }
        assert await client.result("private/disable_cancel_on_disconnect") == "ok"
        assert not sim.connections[0].cod_enabled
    assert not sim.account_cod("id1")


async def test_cod_account_scope_applies_to_connections_authenticating_later(
    sim: Simulator,
) -> None:
    """Scope account is stored; connections take it on auth, authenticated ones keep theirs."""
    get = "private/get_cancel_on_disconnect"
    async with connect(sim) as first, connect(sim) as not_yet_authed:
        await first.auth()
        await first.result("private/enable_cancel_on_disconnect", {"scope": "account"})
        assert sim.account_cod("id1")
        assert await first.result(get, {"scope": "account"}) == {
            "scope": "account",
            "enabled": True,
        }
        assert await first.result(get) == {"scope": "connection", "enabled": False}
        await not_yet_authed.auth()
        assert await not_yet_authed.result(get) == {"scope": "connection", "enabled": True}
        async with connect(sim) as later:
            await later.auth()
            await first.result("private/disable_cancel_on_disconnect", {"scope": "account"})
            assert await later.result(get) == {"scope": "connection", "enabled": True}
        async with connect(sim) as other_account:
            await other_account.auth("id2", "other-secret")
            assert await other_account.result(get) == {"scope": "connection", "enabled": False}
    assert not sim.account_cod("id1")
    assert [c.cod_enabled for c in sim.connections] == [False, True, True, False]


async def test_cod_survives_reauthentication_as_same_account(sim: Simulator) -> None:
    """Refreshing on the same connection keeps the COD that connection already has."""
    async with connect(sim) as client:
        tokens = await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
        await client.result(
            "public/auth", {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        )
        assert (await client.result("private/get_cancel_on_disconnect"))["enabled"] is True


@pytest.mark.parametrize("method", PRIVATE_METHODS[:3])
async def test_cod_unknown_scope_is_invalid_params(sim: Simulator, method: str) -> None:
    """A COD scope other than connection or account gets -32602 naming scope."""
    async with connect(sim) as client:
        await client.auth()
        error = await client.error(method, {"scope": "planet"})
    assert error["code"] == -32602
    assert error["data"]["param"] == "scope"


# Ends of connections --------------------------------------------------------------------------


async def test_logout_closes_without_answer_and_cod_does_not_fire(sim: Simulator) -> None:
    """private/logout gets no answer, the server closes with 1000, COD does not fire."""
    async with connect(sim) as client:
        tokens = await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
        await client.send("private/logout")
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1000
    conn = sim.connections[0]
    assert (conn.logged_out, conn.cod_enabled, conn.cod_fired) == (True, True, False)
    assert (conn.closed_by, conn.close_code) == ("server", 1000)
    async with connect(sim) as client:
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        assert (await client.error("public/auth", refresh))["code"] == 13009


async def test_logout_can_keep_tokens(sim: Simulator) -> None:
    """private/logout with invalidate_token false leaves the session's tokens usable."""
    async with connect(sim) as client:
        tokens = await client.auth()
        await client.send("private/logout", {"invalidate_token": False})
        with pytest.raises(ConnectionClosed):
            await client.recv()
    async with connect(sim) as client:
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        await client.result("public/auth", refresh)


async def test_client_close_fires_cod(sim: Simulator) -> None:
    """A clean close by the client with COD active is recorded and fires COD."""
    async with connect(sim) as client:
        await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert (conn.closed_by, conn.close_code, conn.abrupt) == ("client", 1000, False)
    assert conn.cod_fired
    assert conn.closed_at is not None
    assert conn.closed_at >= conn.opened_at


async def test_client_abrupt_close_fires_cod(sim: Simulator) -> None:
    """A TCP close with no close frame is recorded as abrupt, by the client, and fires COD."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(sim))
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", API_PATH)
        client = Client(ws)
        await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
        await stream.aclose()
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert (conn.closed_by, conn.close_code, conn.abrupt) == ("client", None, True)
    assert conn.cod_fired


async def test_connection_without_cod_does_not_fire(sim: Simulator) -> None:
    """A connection that never had COD active records cod_fired False when it ends."""
    async with connect(sim) as client:
        await client.auth()
    conn = sim.connections[0]
    await sim.wait_for(lambda: not conn.open)
    assert not conn.cod_fired


async def test_idle_connection_is_closed_after_ten_minutes(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """With no inbound traffic for 600 s the server closes with 1000."""
    async with connect(sim) as client:
        await client.result("public/test")
        started = trio.current_time()
        await trio.sleep(599)
        assert sim.connections[0].open
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert trio.current_time() == pytest.approx(started + 600)
    conn = sim.connections[0]
    assert (conn.closed_by, conn.close_code) == ("server", 1000)


async def test_wrong_path_is_refused_with_404(sim: Simulator) -> None:
    """A handshake for a path other than /ws/api/v2 is refused with HTTP 404."""
    assert await handshake_status(sim, "/other") == 404
    assert sim.connections == []


async def test_33rd_connection_from_one_ip_is_refused_with_429(sim: Simulator) -> None:
    """32 simultaneous connections are accepted; the 33rd handshake gets 429 until one closes."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(sim)) for _ in range(32)]
        assert await handshake_status(sim) == 429
        await clients[0].ws.aclose()
        await sim.wait_for(lambda: not sim.connections[0].open)
        async with connect(sim) as client:
            await client.result("public/test")
    assert sim.rejected_handshakes == [429]
    assert len(sim.connections) == 33


async def test_shutdown_ends_connections_abruptly(nursery: trio.Nursery) -> None:
    """Cancelling serve ends every open connection without a close frame."""
    sim = Simulator(ACCOUNTS, wall_clock=wall)
    serving = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with serving:
            await sim.serve(0, task_status=task_status)

    await nursery.start(serve)
    async with connect(sim) as client:
        await client.result("public/test")
        serving.cancel()
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1006
    conn = sim.connections[0]
    assert (conn.open, conn.closed_by, conn.abrupt) == (False, "server", True)


# Fault injection ------------------------------------------------------------------------------


async def test_fail_next_answers_the_error_the_given_number_of_times(sim: Simulator) -> None:
    """fail_next answers the next N calls of the method with that error, then normally."""
    sim.fail_next("public/test", 13028, times=2)
    async with connect(sim) as client:
        request_id = await client.send("public/test")
        frame = await client.recv()
        assert frame["error"] == {"code": 13028, "message": "temporarily_unavailable"}
        assert_envelope(frame, request_id)
        async with connect(sim) as other:
            assert (await other.error("public/test"))["code"] == 13028
        assert await client.result("public/test") == {"version": API_VERSION}


async def test_fail_next_with_close_after_terminates_the_session(sim: Simulator) -> None:
    """fail_next with close_after answers the error then closes the connection, as 10028 does."""
    sim.fail_next("public/hello", 10028, close_after=True)
    async with connect(sim) as client:
        error = await client.error("public/hello", {"client_name": "t", "client_version": "1"})
        with pytest.raises(ConnectionClosed):
            await client.recv()
    assert error == {"code": 10028, "message": "too_many_requests"}
    assert (sim.connections[0].closed_by, sim.connections[0].close_code) == ("server", 1000)


async def test_fail_next_refuses_unknown_codes(sim: Simulator) -> None:
    """fail_next with a code that has no Deribit message is a ValueError."""
    with pytest.raises(ValueError, match="12345"):
        sim.fail_next("public/test", 12345)


async def test_delay_next_lets_later_answers_overtake(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """A delayed request is answered after the delay, after requests sent behind it."""
    sim.delay_next("public/hello", 5)
    async with connect(sim) as client:
        started = trio.current_time()
        slow = await client.send("public/hello", {"client_name": "t", "client_version": "1"})
        fast = await client.send("public/test")
        assert (await client.recv())["id"] == fast
        assert trio.current_time() == pytest.approx(started)
        assert (await client.recv())["id"] == slow
        assert trio.current_time() == pytest.approx(started + 5)


async def test_misreport_cod_reports_disabled_once(sim: Simulator) -> None:
    """misreport_cod makes the next get_cancel_on_disconnect say false, whatever the truth."""
    async with connect(sim) as client:
        await client.auth()
        await client.result("private/enable_cancel_on_disconnect")
        sim.misreport_cod()
        get = "private/get_cancel_on_disconnect"
        assert (await client.result(get))["enabled"] is False
        assert (await client.result(get))["enabled"] is True
    assert sim.connections[0].cod_enabled


@pytest.mark.parametrize(("abrupt", "code"), [(False, 1000), (True, 1006)])
async def test_drop_ends_the_connection(sim: Simulator, abrupt: bool, code: int) -> None:
    """drop closes with 1000, or with abrupt=True closes TCP without a close frame."""
    async with connect(sim) as client:
        await client.result("public/test")
        await sim.drop(sim.connections[0], abrupt=abrupt)
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.reason is not None
    assert closed.value.reason.code == code
    conn = sim.connections[0]
    assert (conn.open, conn.closed_by, conn.abrupt) == (False, "server", abrupt)
    assert conn.close_code == (None if abrupt else 1000)


async def test_go_silent_sends_nothing_but_keeps_tcp_open(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """A silent connection answers nothing, sends no heartbeat, never idles out, stays open."""
    async with connect(sim) as client:
        await client.result("public/set_heartbeat", {"interval": 10})
        sim.go_silent(sim.connections[0])
        await client.send("public/test")
        with trio.move_on_after(1000):
            await client.recv()
            pytest.fail("a silent connection sent a frame")
        assert sim.connections[0].open
    conn = sim.connections[0]
    assert conn.methods() == ["public/set_heartbeat", "public/test"]
    assert (conn.test_requests_sent, conn.closed_by) == (0, "client")


async def test_suppress_test_requests_keeps_answering(
    sim: Simulator, autojump_clock: trio.testing.MockClock
) -> None:
    """With test_requests suppressed, requests are answered but no heartbeat comes."""
    async with connect(sim) as client:
        await client.result("public/set_heartbeat", {"interval": 10})
        sim.suppress_test_requests(sim.connections[0])
        with trio.move_on_after(100):
            await client.recv()
            pytest.fail("a heartbeat arrived while suppressed")
        assert await client.result("public/test") == {"version": API_VERSION}
    assert sim.connections[0].test_requests_sent == 0


async def test_send_raw_delivers_any_text(sim: Simulator) -> None:
    """send_raw puts an arbitrary text frame on the wire; on an ended connection it raises."""
    async with connect(sim) as client:
        await client.result("public/test")
        await sim.send_raw(sim.connections[0], "garbage{")
        assert await client.ws.get_message() == "garbage{"
    await sim.wait_for(lambda: not sim.connections[0].open)
    with pytest.raises(ValueError, match="ended"):
        await sim.send_raw(sim.connections[0], "late")


async def test_refuse_handshakes_rejects_the_next_n(sim: Simulator) -> None:
    """refuse_handshakes rejects the next n handshakes with the status, then accepts again."""
    sim.refuse_handshakes(2, status=503)
    assert [await handshake_status(sim) for _ in range(2)] == [503, 503]
    async with connect(sim) as client:
        await client.result("public/test")
    assert sim.rejected_handshakes == [503, 503]
    assert [c.id for c in sim.connections] == [1]


# State observation and reprs ------------------------------------------------------------------


async def test_wait_for_wakes_when_a_request_is_recorded(sim: Simulator) -> None:
    """wait_for returns as soon as the predicate becomes true after a state change."""
    seen = trio.Event()

    async def watch() -> None:
        await sim.wait_for(lambda: any("public/test" in c.methods() for c in sim.connections))
        seen.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with connect(sim) as client:
            await client.send("public/test")
            with trio.fail_after(5):
                await seen.wait()


async def test_reprs_never_show_secrets_or_tokens(sim: Simulator) -> None:
    """SimAccount, Simulator and SimConnection reprs hide secrets and tokens."""
    async with connect(sim) as client:
        tokens = await client.auth()
    shown = repr(ACCOUNTS) + repr(sim) + repr(sim.connections)
    for hidden in ("s3cret", "other-secret", tokens["access_token"], tokens["refresh_token"]):
        assert hidden not in shown


def test_duplicate_client_ids_are_refused() -> None:
    """A Simulator given two accounts with one client_id raises ValueError."""
    with pytest.raises(ValueError, match="duplicate client_id"):
        Simulator([ACCOUNTS[0], SimAccount(name="again", client_id="id1", client_secret="x")])


def test_url_before_serving_raises() -> None:
    """sim.url before serve has bound a port raises RuntimeError."""
    with pytest.raises(RuntimeError, match="not serving"):
        _ = Simulator(ACCOUNTS).url


# load_accounts --------------------------------------------------------------------------------


def test_load_accounts_reads_a_list(tmp_path: Path) -> None:
    """load_accounts turns a YAML list of mappings into SimAccounts, in order."""
    path = tmp_path / "accounts.yaml"
    path.write_text(
        "- {name: main, client_id: id1, client_secret: s3cret}\n"
        "- {name: other, client_id: id2, client_secret: other-secret}\n"
    )
    assert load_accounts(path) == ACCOUNTS


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: main\n", "expected a list of accounts"),
        ("", "expected a list of accounts"),
        ("[]\n", "empty"),
        ("- just-a-string\n", "entry 0: expected a mapping"),
        ("- {name: a, client_id: b}\n", "entry 0: missing key 'client_secret'"),
        ("- {name: a, client_id: 5, client_secret: c}\n", "entry 0: 'client_id' must be"),
        ("- {name: a, client_id: b, client_secret: c, x: 1}\n", "entry 0: unknown key 'x'"),
        (
            "- {name: a, client_id: b, client_secret: c}\n"
            "- {name: d, client_id: b, client_secret: e}\n",
            "entry 1: duplicate client_id 'b' (also entry 0)",
        ),
        ("- {name: a, client_id: [b\n", "not valid YAML"),
    ],
)
def test_load_accounts_errors_name_file_and_entry(tmp_path: Path, text: str, problem: str) -> None:
    """Every problem in the accounts file is one ValueError naming the file and the entry."""
    path = tmp_path / "accounts.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_accounts(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message


def test_load_accounts_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is a ValueError naming it."""
    with pytest.raises(ValueError, match="cannot read"):
        load_accounts(tmp_path / "absent.yaml")


def test_conn_record_starts_empty() -> None:
    """A fresh SimConnection is open, anonymous, without COD and without requests."""
    conn = SimConnection(id=1, opened_at=0.0)
    assert (conn.open, conn.client_id, conn.cod_enabled, conn.methods()) == (True, None, False, [])
