"""hypercorn inside the keeper's own Trio loop: one place for binding, logging and serving.

The operations endpoint (``http.py``) and every account's gateway are ASGI apps served this way,
so they share one way to bind (trio binds, hypercorn serves), one lifespan answer and one bridge
from hypercorn's logger to the keeper's structured events.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event
from hypercorn.logging import Logger
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ResponseSummary,
    WWWScope,
)

from . import events
from .logs import get_logger

HTTP_REQUEST: Final = events.HTTP_REQUEST
HTTP_SERVER: Final = events.HTTP_SERVER

# Every answer is ready in microseconds; at shutdown a slow client must not hold the keeper up.
GRACEFUL_TIMEOUT_S: Final = 1.0
# hypercorn's default is 16 MiB. Deribit answers frames over 32 kB with an error; beyond this
# a frame is refused by closing the WebSocket (1009) instead of being read into memory.
WEBSOCKET_MAX_MESSAGE_BYTES: Final = 1024 * 1024

_log = get_logger()


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Nothing to set up or tear down; answering keeps hypercorn from logging a warning."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _StructlogLogger(Logger):
    """hypercorn's access and error log as keeper events, through the keeper's processor chain.

    hypercorn's own Logger writes plain lines and raw tracebacks to stdout and stderr; here each
    request is one ``http.request`` event at debug (probes come every few seconds) and an error
    in the app is one ``http.server`` event with its traceback as a field, redacted like any line.
    """

    def __init__(self, config: Config) -> None:  # no super(): it would attach stream handlers
        self.access_log_format = config.access_log_format
        self.access_logger = None
        self.error_logger = None

    async def access(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        _log.debug(
            HTTP_REQUEST,
            method=request.get("method", "GET"),
            path=request["path"],
            status=None if response is None else response["status"],
            duration_ms=round(request_time * 1000, 3),
        )

    async def critical(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.critical(HTTP_SERVER, message=message % args if args else message)

    async def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.error(HTTP_SERVER, message=message % args if args else message)

    async def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.warning(HTTP_SERVER, message=message % args if args else message)

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.debug(HTTP_SERVER, message=message % args if args else message)

    async def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.debug(HTTP_SERVER, message=message % args if args else message)

    async def exception(self, message: str, *args: Any, **kwargs: Any) -> None:
        _log.error(HTTP_SERVER, message=message % args if args else message, exc_info=True)

    async def log(self, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        _log.log(level, HTTP_SERVER, message=message % args if args else message)


class _ContainedTCPServer(TCPServer):
    """hypercorn's connection handler, so that one connection's failure ends only itself.

    hypercorn (0.17, 0.18) contains only ``OSError`` per connection; anything else escapes to
    the nursery of the whole server and ends it, with every other connection on the port: for a
    gateway, every engine's link, whose local COD then cancels their orders. A local client can
    cause one: a request with ``Connection: close`` with another right behind it makes
    hypercorn send EOF (outside its send lock) while answering the second (inside it), and trio
    raises ``BusyResourceError`` (found by ``tests/test_fuzz_gateway.py``). That answer has
    nowhere to go, since the connection is closing: it is dropped, as hypercorn drops one whose
    peer has gone. Anything else that escapes a connection is a bug: logged with its
    traceback, that connection closed, the server kept.
    """

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:  # noqa: BLE001 (one connection's bug must not end the server)
            _log.exception(HTTP_SERVER, message="a connection failed; only it was closed")


# hypercorn's Trio worker builds each connection's handler from this module global.
hypercorn.trio.run.TCPServer = _ContainedTCPServer  # type: ignore[attr-defined]


class _Started(trio.TaskStatus[list[str]]):
    """Tells our caller the port once hypercorn reports that it serves (``started(binds)``)."""

    def __init__(
        self, port: int, listening: Callable[[int], None], task_status: trio.TaskStatus[int]
    ) -> None:
        self._port, self._listening, self._task_status = port, listening, task_status

    def started(self, value: list[str] | None = None) -> None:
        self._listening(self._port)
        self._task_status.started(self._port)


async def serve_asgi(
    app: ASGIFramework,
    host: str,
    port: int,
    *,
    listening: Callable[[int], None],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; ``listening(port)`` once it serves, then
    the bound port through ``task_status`` (port 0 picks one). Cancellation closes the listener
    and every open connection at once.

    Raises:
        OSError: the address cannot be bound (in use, not local, permission), before started.
    """
    # We bind, hypercorn serves: a bind error is then a plain OSError from trio (hypercorn's
    # own would arrive in nested exception groups and leak its socket), and port 0 is read off
    # the socket. hypercorn gets a duplicate of the descriptor (``fd://``) and closes that one;
    # ours is closed here. A name with several addresses is served on the first, like the
    # simulator does, so that one port means one address.
    first, *others = await trio.open_tcp_listeners(port, host=host or None)
    for other in others:
        await other.aclose()
    async with first:
        config = Config()
        config.bind = [f"fd://{os.dup(first.socket.fileno())}"]
        config.logger_class = _StructlogLogger
        config.accesslog = config.errorlog = None
        config.graceful_timeout = GRACEFUL_TIMEOUT_S
        config.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE_BYTES
        config.include_server_header = False  # no need to tell a scanner what serves this
        bound = int(first.socket.getsockname()[1])
        await serve(app, config, task_status=_Started(bound, listening, task_status), mode="asgi")
