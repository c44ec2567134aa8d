"""JSON-RPC over one WebSocket, against small scripted servers on loopback."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from deribit_keeper.errors import RpcError, SessionLost
from deribit_keeper.rpc import Reply, open_rpc_connection

Script = Callable[[WebSocketConnection], Awaitable[None]]


async def serve(nursery: trio.Nursery, script: Script, *, reject: int | None = None) -> str:
    """Serve ``script`` for every WebSocket on an ephemeral loopback port; return the URL."""

    async def handler(request: WebSocketRequest) -> None:
        if reject is not None:
            await request.reject(reject)
            return
        ws = await request.accept()
        try:
            await script(ws)
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/ws/api/v2"


def answer(request: dict[str, Any], result: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result})


def ignore(_method: str, _params: Any) -> None:
    """A notification sink for tests that expect none."""


async def test_answers_are_matched_by_id_even_out_of_order(nursery: trio.Nursery) -> None:
    """Two requests in flight get their own answers when the server answers the second first."""

    async def script(ws: WebSocketConnection) -> None:
        first = json.loads(await ws.get_message())
        second = json.loads(await ws.get_message())
        await ws.send_message(answer(second, "second"))
        await ws.send_message(answer(first, "first"))
        await trio.sleep_forever()

    url = await serve(nursery, script)
    results: dict[str, Any] = {}
    async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:

        async def ask(name: str) -> None:
            results[name] = await rpc.call(name)

        async with trio.open_nursery() as inner:
            inner.start_soon(ask, "first")
            await trio.sleep(0.01)
            inner.start_soon(ask, "second")
    assert results == {"first": "first", "second": "second"}


async def test_error_answer_raises_rpc_error_with_code_and_message(nursery: trio.Nursery) -> None:
    """Deribit's error object becomes an RpcError naming the method, code and message."""

    async def script(ws: WebSocketConnection) -> None:
        request = json.loads(await ws.get_message())
        error = {"code": 13004, "message": "invalid_credentials"}
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}))
        await trio.sleep_forever()

    url = await serve(nursery, script)
    with pytest.raises(RpcError) as caught:
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
            await rpc.call("public/auth", {"grant_type": "client_credentials"})
    assert (caught.value.method, caught.value.code, caught.value.message) == (
        "public/auth",
        13004,
        "invalid_credentials",
    )
    assert caught.value.reason == "rpc_error"


async def test_unanswered_request_times_out_and_a_late_answer_is_ignored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A request past its timeout raises request_timeout; its late answer harms nothing."""
    held: list[dict[str, Any]] = []

    async def script(ws: WebSocketConnection) -> None:
        held.append(json.loads(await ws.get_message()))
        second = json.loads(await ws.get_message())
        await ws.send_message(answer(held[0], "late"))
        await ws.send_message(answer(second, "on time"))
        await trio.sleep_forever()

    url = await serve(nursery, script)
    async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
        with pytest.raises(SessionLost) as caught:
            await rpc.call("public/test", timeout=2)
        assert caught.value.reason == "request_timeout"
        assert await rpc.call("public/test") == "on time"


async def test_notifications_reach_the_callback(nursery: trio.Nursery) -> None:
    """A frame with a method and no id is handed over as (method, params)."""
    seen: list[tuple[str, Any]] = []
    received = trio.Event()

    async def script(ws: WebSocketConnection) -> None:
        note = {"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}}
        await ws.send_message(json.dumps(note))
        await trio.sleep_forever()

    def on_notification(method: str, params: Any) -> None:
        seen.append((method, params))
        received.set()

    url = await serve(nursery, script)
    async with open_rpc_connection(url, request_timeout=5, on_notification=on_notification):
        await received.wait()
    assert seen == [("heartbeat", {"type": "test_request"})]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{not json", "malformed_frame"),
        ("[1, 2]", "malformed_frame"),
        ('{"jsonrpc": "2.0"}', "malformed_frame"),
        (
            '{"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}',
            "request_rejected",
        ),
    ],
)
async def test_malformed_frames_end_the_connection(
    nursery: trio.Nursery, frame: str, reason: str
) -> None:
    """Garbage from the exchange ends the link with a reason, and cancels the caller's wait."""

    async def script(ws: WebSocketConnection) -> None:
        await ws.get_message()
        await ws.send_message(frame)
        await trio.sleep_forever()

    url = await serve(nursery, script)
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
            await rpc.call("public/test")
    assert caught.value.reason == reason


async def test_a_token_in_a_malformed_frame_is_not_repeated(nursery: trio.Nursery) -> None:
    """The error for an unreadable frame says its size, never its content."""

    async def script(ws: WebSocketConnection) -> None:
        await ws.send_message('{"access_token": "1582628593469.1MbQ-J_4.CBP-secret"')
        await trio.sleep_forever()

    url = await serve(nursery, script)
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore):
            await trio.sleep_forever()
    assert "1MbQ" not in str(caught.value)


@pytest.mark.parametrize(
    ("abrupt", "reason"), [(False, "closed_by_server"), (True, "connection_dropped")]
)
async def test_a_close_by_the_server_is_reported_with_its_kind(
    nursery: trio.Nursery, abrupt: bool, reason: str
) -> None:
    """A clean close and a TCP drop both end the link, with different reasons."""

    async def script(ws: WebSocketConnection) -> None:
        await ws.get_message()
        if abrupt:
            await trio.aclose_forcefully(ws._stream)
        else:
            await ws.aclose(1000)

    url = await serve(nursery, script)
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
            await rpc.call("public/test")
    assert caught.value.reason == reason


async def test_connection_refused_is_connect_failed() -> None:
    """Nobody listening: connect_failed, promptly."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(
            f"ws://127.0.0.1:{port}/ws/api/v2", request_timeout=5, on_notification=ignore
        ):
            pass
    assert caught.value.reason == "connect_failed"


async def test_rejected_handshake_names_the_http_status(nursery: trio.Nursery) -> None:
    """Deribit's 429 for too many connections shows up as handshake_rejected with the status."""
    url = await serve(nursery, ignore_script, reject=429)
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore):
            pass
    assert caught.value.reason == "handshake_rejected"
    assert "429" in caught.value.detail


async def ignore_script(ws: WebSocketConnection) -> None:
    await trio.sleep_forever()


async def test_a_server_that_never_completes_the_handshake_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """TCP accepted but no WebSocket upgrade: connect_timeout after request_timeout."""

    async def never_upgrade(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, never_upgrade, 0)
    port = listeners[0].socket.getsockname()[1]
    start = trio.current_time()
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(
            f"ws://127.0.0.1:{port}/", request_timeout=3, on_notification=ignore
        ):
            pass
    assert caught.value.reason == "connect_timeout"
    assert trio.current_time() - start == pytest.approx(3, abs=0.1)


async def test_tls_failure_is_connect_failed(nursery: trio.Nursery) -> None:
    """wss:// to a server that does not speak TLS fails as connect_failed, not a hang."""

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, hang_up, 0)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(SessionLost) as caught:
        async with open_rpc_connection(
            f"wss://localhost:{port}/", request_timeout=5, on_notification=ignore
        ):
            pass
    assert caught.value.reason == "connect_failed"


async def test_silence_watchdog_fires_after_the_limit_and_frames_push_it_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Frames every 4 s keep a 5 s watchdog quiet; when they stop it fires 5 s after the last."""

    async def script(ws: WebSocketConnection) -> None:
        for _ in range(3):
            await trio.sleep(4)
            await ws.send_message('{"jsonrpc": "2.0", "method": "heartbeat", "params": {}}')
        await trio.sleep_forever()

    url = await serve(nursery, script)
    async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
        start = trio.current_time()
        with rpc.silence_watchdog(5) as watchdog:
            await trio.sleep_forever()
        assert watchdog.cancelled_caught
        assert trio.current_time() - start == pytest.approx(12 + 5, abs=0.1)


@pytest.mark.parametrize(("fail", "close_code"), [(False, 1000), (True, 1006)])
async def test_normal_exit_closes_politely_and_an_error_aborts(
    nursery: trio.Nursery, fail: bool, close_code: int
) -> None:
    """Leaving normally sends a close frame; leaving on an error drops TCP without one."""
    seen: list[int] = []
    done = trio.Event()

    async def script(ws: WebSocketConnection) -> None:
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            seen.append(exc.reason.code)
            done.set()

    url = await serve(nursery, script)
    with pytest.raises(RuntimeError) if fail else _no_error():
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore):
            if fail:
                raise RuntimeError("boom")
    await done.wait()
    assert seen == [close_code]


class _no_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_relayed_requests_leave_in_order_and_come_back_whole(nursery: trio.Nursery) -> None:
    """A relay's requests reach the server in the order sent; each answer is handed over as
    the server wrote it (envelope and all), by callback or to an awaiting caller."""
    seen: list[str] = []

    async def script(ws: WebSocketConnection) -> None:
        requests = [json.loads(await ws.get_message()) for _ in range(3)]
        seen.extend(r["method"] for r in requests)
        for request in reversed(requests):
            await ws.send_message(
                json.dumps(
                    {"jsonrpc": "2.0", "id": request["id"], "result": request["method"], "usIn": 1}
                )
            )
        await trio.sleep_forever()

    url = await serve(nursery, script)
    called: list[dict[str, Any] | None] = []
    async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
        first = await rpc.send_relayed("private/cancel_all", {})
        await rpc.send_relayed("private/buy", {"amount": 10}, called.append)
        third = await rpc.send_relayed("private/sell", {})
        answers = [await first.answer(), await third.answer()]
        await trio.sleep(0.05)
    assert seen == ["private/cancel_all", "private/buy", "private/sell"]
    assert [a["result"] for a in answers] == ["private/cancel_all", "private/sell"]
    assert answers[0]["usIn"] == 1 and "jsonrpc" in answers[0]
    assert [c and c["result"] for c in called] == ["private/buy"]


async def test_a_link_that_ends_releases_every_relayed_request(nursery: trio.Nursery) -> None:
    """Nothing waits forever on a dead link: waiters get SessionLost, callbacks get None."""

    async def script(ws: WebSocketConnection) -> None:
        for _ in range(2):
            await ws.get_message()
        await ws.aclose()

    url = await serve(nursery, script)
    called: list[dict[str, Any] | None] = []
    with pytest.raises(SessionLost):
        async with open_rpc_connection(url, request_timeout=5, on_notification=ignore) as rpc:
            waiting = await rpc.send_relayed("private/buy", {})
            await rpc.send_relayed("private/sell", {}, called.append)
            with pytest.raises(SessionLost, match="link ended"):
                await waiting.answer()
            await trio.sleep_forever()
    assert called == [None]


async def test_a_notification_s_reply_is_sent_at_once_and_its_answer_handed_over(
    nursery: trio.Nursery,
) -> None:
    """The reader sends the reply a notification asks for, and the answer reaches
    ``on_answer``; an ``on_answer`` that raises SessionLost ends the link."""
    order: list[str] = []

    async def script(ws: WebSocketConnection) -> None:
        await ws.send_message('{"jsonrpc": "2.0", "method": "ping", "params": {}}')
        await ws.send_message('{"jsonrpc": "2.0", "method": "later", "params": {}}')
        request = json.loads(await ws.get_message())
        assert request["method"] == "public/test"
        await ws.send_message(answer(request, "pong"))
        await ws.send_message('{"jsonrpc": "2.0", "method": "ping", "params": {}}')
        second = json.loads(await ws.get_message())
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": second["id"], "result": 1}))
        await trio.sleep_forever()

    def on_answer(message: dict[str, Any] | None) -> None:
        assert message is not None
        order.append(f"answer {message['result']}")
        if message["result"] == 1:
            raise SessionLost("test_refused", "the caller ends the link")

    def on_notification(method: str, _params: Any) -> Reply | None:
        order.append(method)
        return Reply("public/test", {}, on_answer) if method == "ping" else None

    url = await serve(nursery, script)
    with pytest.raises(SessionLost) as caught, trio.fail_after(5):
        async with open_rpc_connection(url, request_timeout=5, on_notification=on_notification):
            await trio.sleep_forever()
    assert caught.value.reason == "test_refused"
    assert order == ["ping", "later", "answer pong", "ping", "answer 1"]
