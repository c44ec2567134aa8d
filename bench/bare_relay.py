"""The floor under the gateway's cost: a WebSocket relay that does nothing but copy frames.

gateway_roundtrip.py runs this as its own process, as it runs the keeper, to measure what ANY
one more Python/Trio WebSocket hop costs on the machine: every connection accepted on loopback
gets its own client connection to ``--upstream``, and two tasks copy every message both ways,
unparsed (so ``public/auth`` passes straight through to the simulator). No JSON, no ids, no
shared session, no logging per frame: what it costs is the libraries' framing, Trio's scheduling
and the syscalls, the part of the gateway's cost that no gateway logic can remove.

``--server trio-websocket`` accepts with trio-websocket's ``serve_websocket``; ``--server
hypercorn`` accepts with hypercorn's Trio worker and an ASGI app, configured as the keeper's
gateway is (serving.py), so the two floors differ only by the server library on the local hop.
The upstream side is trio-websocket in both, as the keeper's session is.

The first line on stdout is the bound port; any later line is a complaint (the benchmark reports
them). It runs until SIGTERM.

    python bench/bare_relay.py --upstream ws://127.0.0.1:PORT/ws/api/v2 --server hypercorn
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from deribit_keeper.serving import lifespan

SERVERS: Final = ("trio-websocket", "hypercorn")
MAX_MESSAGE_BYTES: Final = 1024 * 1024  # as the keeper's gateway caps a local frame


def complain(what: str, error: BaseException) -> None:
    """One line on stdout, which the benchmark reads as a warning."""
    print(f"bare_relay: {what}: {type(error).__name__}: {error}", flush=True)


async def copy(source: WebSocketConnection, sink: WebSocketConnection) -> None:
    """Every message from ``source`` to ``sink``, until either side closes."""
    try:
        while True:
            await sink.send_message(await source.get_message())
    except ConnectionClosed:
        pass


# ---- trio-websocket's server --------------------------------------------------------------


async def trio_websocket_relay(upstream: str, task_status: trio.TaskStatus[int]) -> None:
    async def handler(request: WebSocketRequest) -> None:
        local = await request.accept()
        try:
            async with open_websocket_url(upstream) as remote, trio.open_nursery() as nursery:

                async def one_way(source: WebSocketConnection, sink: WebSocketConnection) -> None:
                    await copy(source, sink)
                    nursery.cancel_scope.cancel()  # one side ended: end the other

                nursery.start_soon(one_way, local, remote)
                nursery.start_soon(one_way, remote, local)
        except Exception as error:  # noqa: BLE001 - a relay that fails must say so, not die
            complain("link", error)
        await local.aclose()

    async with trio.open_nursery() as nursery:
        # ssl_context None: plain ws://
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        task_status.started(server.port)


# ---- hypercorn's server, with an ASGI app -------------------------------------------------


class HypercornRelay:
    """The ASGI app: each accepted WebSocket relayed to its own trio-websocket client."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)  # the keeper's own, so the floor shares its plumbing
            return
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        try:
            async with open_websocket_url(self._upstream) as remote, trio.open_nursery() as nursery:

                async def down() -> None:  # local -> upstream
                    try:
                        while True:
                            event = await receive()
                            if event["type"] == "websocket.disconnect":
                                break
                            if event["type"] == "websocket.receive":
                                text = event.get("text")
                                await remote.send_message(
                                    text if text is not None else event.get("bytes") or b""
                                )
                    except ConnectionClosed:
                        pass  # upstream ended: up() closes the local side
                    nursery.cancel_scope.cancel()

                async def up() -> None:  # upstream -> local
                    try:
                        while True:
                            message = await remote.get_message()
                            if isinstance(message, str):
                                await send(
                                    {"type": "websocket.send", "bytes": None, "text": message}
                                )
                            else:
                                await send(
                                    {"type": "websocket.send", "bytes": message, "text": None}
                                )
                    except ConnectionClosed:
                        await send({"type": "websocket.close", "code": 1000, "reason": None})
                    nursery.cancel_scope.cancel()

                nursery.start_soon(down)
                nursery.start_soon(up)
        except Exception as error:  # noqa: BLE001 - a relay that fails must say so, not die
            complain("link", error)


class _Started(trio.TaskStatus[list[str]]):
    """Passes hypercorn's ``started(binds)`` on as the port we bound."""

    def __init__(self, port: int, task_status: trio.TaskStatus[int]) -> None:
        self._port, self._task_status = port, task_status

    def started(self, value: list[str] | None = None) -> None:
        self._task_status.started(self._port)


async def hypercorn_relay(upstream: str, task_status: trio.TaskStatus[int]) -> None:
    # As serving.py does for the keeper: trio binds port 0, hypercorn serves a dup of it.
    listener, *others = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for other in others:
        await other.aclose()
    async with listener:
        config = Config()
        config.bind = [f"fd://{os.dup(listener.socket.fileno())}"]
        config.accesslog = None
        config.errorlog = "-"  # to stderr, which the benchmark reads with stdout...
        config.loglevel = "WARNING"  # ...for complaints only: no "Running on" line
        config.graceful_timeout = 1.0
        config.websocket_max_message_size = MAX_MESSAGE_BYTES
        config.include_server_header = False
        port = int(listener.socket.getsockname()[1])
        await serve(
            HypercornRelay(upstream), config, task_status=_Started(port, task_status), mode="asgi"
        )


async def run(upstream: str, server: str) -> None:
    relay = trio_websocket_relay if server == "trio-websocket" else hypercorn_relay
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay, upstream)
        print(port, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--upstream", required=True, help="ws:// URL each connection relays to")
    parser.add_argument("--server", choices=SERVERS, default=SERVERS[0], help="local side")
    args = parser.parse_args(argv)
    trio.run(run, args.upstream, args.server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
