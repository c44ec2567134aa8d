"""bench/load_sim.py answers as the real simulator does, for everything the keeper sends.

The benchmark measures the keeper against a lean load simulator, not the real one, so that the
simulator's own work stays out of the figures. That is only honest if the keeper cannot tell
them apart: here the same request sequence (the keeper's set-up, both auth grants, a refresh,
COD at both scopes, heartbeats and their test_request, errors on bad params, an unknown method,
a frame that is not JSON, logout) goes to both, and the answers must be identical, except the
values that are random or clocks (tokens; usIn, usOut, usDiff).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from deribit_keeper.protocol import sign
from deribit_keeper.simulator import SimAccount, Simulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from load_sim import LoadSim

TOKEN_TTL_S = 3600.0
CLOCKS = ("usIn", "usOut", "usDiff")
TOKENS = ("access_token", "refresh_token")


def normalized(raw: str | bytes) -> Any:
    """A frame with its clocks removed and its tokens replaced by a placeholder."""
    frame = json.loads(raw)
    for key in CLOCKS:
        frame.pop(key, None)
    result = frame.get("result")
    if isinstance(result, dict):
        for key in TOKENS:
            if key in result:
                result[key] = "<token>"
    return frame


def signed(client_id: str, secret: str, nonce: str, *, wrong: bool = False) -> dict[str, Any]:
    timestamp = int(time.time() * 1000)
    signature = sign(secret + ("x" if wrong else ""), timestamp, nonce)
    return {"grant_type": "client_signature", "client_id": client_id, "timestamp": timestamp,
            "nonce": nonce, "signature": signature}  # fmt: skip


async def call(ws: WebSocketConnection, request_id: int, method: str, params: Any) -> Any:
    await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": params}))  # fmt: skip
    return json.loads(await ws.get_message())


@asynccontextmanager
async def opened(port: int) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket whose socket is always closed (trio-websocket leaves it open when the
    server ends the link first, which the test policy's warnings would flag)."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", "/ws/api/v2")
            yield ws
            with trio.move_on_after(2):
                await ws.aclose()
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def conversation(port: int) -> list[Any]:
    """The sequence, as normalized answers (and the close code of the logout)."""
    seen: list[Any] = []
    async with opened(port) as anonymous:
        answer = await call(anonymous, 1, "private/get_cancel_on_disconnect", {})
        seen.append(normalized(json.dumps(answer)))
        await anonymous.send_message("not json")
        seen.append(normalized(await anonymous.get_message()))
    async with opened(port) as ws:
        steps: list[tuple[str, Any]] = [
            ("public/hello", {"client_name": "deribit-keeper", "client_version": "0.1.0"}),
            ("public/hello", {}),
            (
                "public/auth",
                {"grant_type": "client_credentials", "client_id": "id0", "client_secret": "wrong"},
            ),
            (
                "public/auth",
                {
                    "grant_type": "client_credentials",
                    "client_id": "nobody",
                    "client_secret": "secret0",
                },
            ),
            ("public/auth", signed("id0", "secret0", "nonce-1", wrong=True)),
            ("public/auth", signed("id0", "secret0", "nonce-2")),
            ("public/auth", signed("id0", "secret0", "nonce-2")),  # a reused nonce
            (
                "public/auth",
                {
                    "grant_type": "client_credentials",
                    "client_id": "id0",
                    "client_secret": "secret0",
                },
            ),
            ("public/auth", {"grant_type": "password"}),
            ("private/get_cancel_on_disconnect", {}),
            ("private/enable_cancel_on_disconnect", {}),
            ("private/get_cancel_on_disconnect", {"scope": "connection"}),
            ("private/get_cancel_on_disconnect", {"scope": "account"}),
            ("private/enable_cancel_on_disconnect", {"scope": "account"}),
            ("private/get_cancel_on_disconnect", {"scope": "account"}),
            ("private/disable_cancel_on_disconnect", {"scope": "account"}),
            ("private/get_cancel_on_disconnect", {"scope": "everything"}),
            ("public/set_heartbeat", {"interval": 5}),
            ("public/set_heartbeat", {"interval": "ten"}),
            ("public/set_heartbeat", {"interval": 10}),
        ]
        for request_id, (method, params) in enumerate(steps, 10):
            answer = await call(ws, request_id, method, params)
            seen.append(normalized(json.dumps(answer)))
            if method == "public/auth" and "result" in answer:
                refresh = answer["result"]["refresh_token"]
        seen.append(normalized(await ws.get_message()))  # the test_request, 10 s later
        for request_id, (method, params) in enumerate(
            [
                ("public/test", {}),
                ("public/test", {"expected_result": "exception"}),
                ("public/auth", {"grant_type": "refresh_token", "refresh_token": refresh}),
                ("public/auth", {"grant_type": "refresh_token", "refresh_token": refresh}),
                ("public/no_such_method", {}),
                ("public/disable_heartbeat", {}),
            ],
            100,
        ):
            seen.append(normalized(json.dumps(await call(ws, request_id, method, params))))
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 200, "method": "private/logout",
                                          "params": {"invalidate_token": False}}))  # fmt: skip
        try:
            seen.append(await ws.get_message())
        except ConnectionClosed as closed:
            seen.append(("closed", closed.reason.code if closed.reason else None))
    return seen


@asynccontextmanager
async def serving(server: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve, 0)
        yield port
        nursery.cancel_scope.cancel()


async def test_load_sim_answers_as_the_real_simulator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same requests get the same answers, the test_request included, from both."""
    real = Simulator([SimAccount("a0", "id0", "secret0")], token_ttl_s=TOKEN_TTL_S)
    lean = LoadSim(1, phase="deribit", token_ttl_s=TOKEN_TTL_S)
    with trio.fail_after(60):
        async with serving(real) as port:
            expected = await conversation(port)
        async with serving(lean) as port:
            got = await conversation(port)
    assert got == expected
    assert ("closed", 1000) in got


async def test_load_sim_stamps_the_answer_to_each_test_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A test_request answered with public/test leaves one latency and one ready link."""
    lean = LoadSim(1, phase="spread")
    with trio.fail_after(60):
        async with serving(lean) as port, opened(port) as ws:
            await call(ws, 1, "public/set_heartbeat", {"interval": 10})
            assert lean.ready == 1
            assert json.loads(await ws.get_message())["params"] == {"type": "test_request"}
            await call(ws, 2, "public/test", {})
            assert [len(v) for v in lean.stats.latencies.values()] == [1]
