"""JSON-RPC 2.0 over one WebSocket: ids, requests in flight, timeouts, notifications.

The transport knows no lifecycle: nothing here knows what COD, a heartbeat or a session is. It
matches answers to requests by id (several may be in flight, answered in any order), bounds every
wait, hands notifications to the caller (who may ask for a request in reply, sent by the reader at
once), and remembers when the last frame arrived so that a silent link can be noticed
(``silence_watchdog``).

This is the one module that catches trio-websocket's and the OS's exceptions: each leaves as a
``SessionLost`` whose ``reason`` slug names the cause, with the original as ``__cause__``.
"""

from __future__ import annotations

import itertools
import json
import math
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .errors import ClosedAfterRateLimit, FrameTooLarge, RpcError, SessionLost, leaves
from .protocol import MAX_FRAME_BYTES, ErrorCode

CLOSE_TIMEOUT_S: Final = 1.0  # a polite close waits this long for the server's close frame
NORMAL_CLOSURE: Final = 1000  # RFC 6455 close code
MESSAGE_TOO_BIG: Final = 1009  # RFC 6455: trio-websocket closes with it on a frame over its limit

OnRequest = Callable[[str, float], None]
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@cache
def _default_ssl_context() -> ssl.SSLContext:
    """One verifying context for every connection: building one costs milliseconds and memory."""
    return ssl.create_default_context()


OnAnswer = Callable[[dict[str, Any] | None], None]  # a relayed answer, or None: the link ended


class Reply(NamedTuple):
    """A request that a notification calls for, sent by the reader before it reads on.

    Sending it from the reader, rather than from a task started for it, is what a heartbeat's
    test_request wants: the answer leaves as soon as the frame is read, in order, and costs no
    task, no event and no waiting coroutine per notification. ``on_answer`` is told the answer
    (or None if the link ends first) from the reader; unlike a relay's, it may raise
    ``SessionLost`` to end the link, as a frame the link cannot read would. Its answer is
    bounded by ``request_timeout`` like a ``call``'s: the reader ends the link when one is late.
    """

    method: str
    params: Mapping[str, Any]
    on_answer: OnAnswer


OnNotification = Callable[[str, Any], Reply | None]


class _Pending:
    """A request waiting for its answer; ``answered`` is also set, with no message, when the
    link ends first. With ``on_answer`` the answer is handed over at once instead, from the
    reader, and nobody waits on ``answered``."""

    __slots__ = ("answered", "message", "on_answer")

    def __init__(self, on_answer: OnAnswer | None = None) -> None:
        self.answered = trio.Event()
        self.message: dict[str, Any] | None = None
        self.on_answer = on_answer


class Relayed:
    """A request sent on someone else's behalf, whose whole answer is awaited separately.

    Splitting the send from the wait lets a relay send its client's requests upstream in the
    order they came, while their answers arrive in any order.
    """

    __slots__ = ("_conn", "_id", "_pending", "method")

    def __init__(
        self, conn: RpcConnection, request_id: int, pending: _Pending, method: str
    ) -> None:
        self._conn, self._id, self._pending, self.method = conn, request_id, pending, method

    async def answer(self) -> dict[str, Any]:
        """Deribit's answer as it arrived: ``result`` or ``error``, ``usIn``, ``usOut``, ...

        Waits as long as the link lives: a relayed order's fate is known only from its answer,
        and a guess (a timeout error) could make its client send it twice. The link's own
        watchdog bounds that wait. On cancellation the request is forgotten.

        Raises:
            SessionLost: the link ended before the answer arrived.
        """
        try:
            await self._pending.answered.wait()
        finally:
            self._conn._pending.pop(self._id, None)
        if self._pending.message is None:
            raise SessionLost("connection_closed", f"{self.method} unanswered: the link ended")
        return self._pending.message

    def forget(self) -> None:
        """Stop waiting for the answer (a late one is ignored)."""
        self._conn._pending.pop(self._id, None)


class RpcConnection:
    """One JSON-RPC conversation over an open WebSocket.

    Create it with ``open_rpc_connection``, which owns the background reader and closes the link.

    Attributes:
        request_timeout: the default bound, in seconds, on any single request.
        last_inbound: ``trio.current_time()`` when the last frame of any kind arrived.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: Stream,
        *,
        on_notification: OnNotification,
        request_timeout: float,
        on_request: OnRequest | None = None,
    ) -> None:
        self._ws = ws
        self._on_request = on_request
        self._stream = stream
        self._on_notification = on_notification
        self.request_timeout = request_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.last_inbound = trio.current_time()
        self._watchdogs: list[tuple[trio.CancelScope, float]] = []  # (scope, silence limit)
        # Replies sent and not yet answered, by id: (sent at, method). The reader runs inside
        # ``_replies_due``, whose deadline is the oldest one's sent time + request_timeout.
        self._replies: dict[int, tuple[float, str]] = {}
        self._replies_due = trio.CancelScope()
        self._closing = False  # we started the end of this link: a close is expected, not a loss
        self._rate_limited = False  # an answer said 10028: Deribit is about to close the link
        self._spoiled: SessionLost | None = None  # a bad frame came while we were closing
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return f"<RpcConnection in_flight={len(self._pending)} closed={self._closed.is_set()}>"

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return its ``result``.

        Raises:
            RpcError: Deribit answered with an error object.
            SessionLost: no answer within ``timeout`` (default ``request_timeout``), the link
                closed, or the answer was malformed. On cancellation the request is forgotten and
                a late answer is ignored.
        """
        limit = self.request_timeout if timeout is None else timeout
        sent_at = trio.current_time()
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        try:
            with trio.move_on_after(limit) as scope:
                await self._send({"jsonrpc": "2.0", "id": request_id, "method": method,
                                  "params": dict(params or {})})  # fmt: skip
                await pending.answered.wait()
        finally:
            del self._pending[request_id]
        if scope.cancelled_caught:
            raise SessionLost("request_timeout", f"{method} unanswered after {limit:g}s")
        if pending.message is None:
            raise SessionLost("connection_closed", f"{method} unanswered: the link ended")
        if self._on_request is not None:
            self._on_request(method, trio.current_time() - sent_at)
        return result_of(method, pending.message)

    async def send_relayed(
        self, method: str, params: Mapping[str, Any], on_answer: OnAnswer | None = None
    ) -> Relayed:
        """Send one request now and return a handle on its answer (see ``Relayed.answer``).

        With ``on_answer`` the reader calls it with the whole answer the moment it arrives, or
        with None if the link ends first: no task waits, which is what a relay's latency wants.
        It runs inside the reader, so it must be quick and must not raise.

        Raises:
            SessionLost: the link is closed; nothing was sent.
            FrameTooLarge: the request would be over Deribit's 32 kB; nothing was sent.
        """
        if self._closed.is_set():
            raise SessionLost("connection_closed", f"{method} not sent: the link ended")
        request_id = next(self._ids)
        # ``on_answer`` is attached only once the send is over, so that it is told exactly
        # once, and never when this raises: the link may end, or even answer, mid-send.
        pending = self._pending[request_id] = _Pending()
        try:
            await self._send({"jsonrpc": "2.0", "id": request_id, "method": method,
                              "params": dict(params)})  # fmt: skip
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        if on_answer is not None:
            if pending.answered.is_set():  # answered, or the link ended, while we sent
                self._pending.pop(request_id, None)
                on_answer(pending.message)
            else:
                pending.on_answer = on_answer
        return Relayed(self, request_id, pending, method)

    async def call_expecting_close(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float
    ) -> bool:
        """Send a request that the server answers by closing the link (``private/logout``).

        Returns whether the server closed the link within ``timeout`` seconds (sending included).

        Raises:
            RpcError: the server answered with an error instead of closing.
            SessionLost: a frame this link cannot read came instead of the close.
        """
        self._closing = True
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        try:
            with trio.move_on_after(timeout):
                try:
                    await self._send({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": dict(params or {})})  # fmt: skip
                except SessionLost:
                    return True  # already closed
                async with trio.open_nursery() as race:
                    race.start_soon(_set_when, self._closed, race.cancel_scope)
                    race.start_soon(_set_when, pending.answered, race.cancel_scope)
        finally:
            del self._pending[request_id]
        if self._spoiled is not None:
            raise self._spoiled  # a bad frame, not the server's close, ended the link
        if pending.message is not None and not self._closed.is_set():
            result_of(method, pending.message)  # raises RpcError for an error answer
        return self._closed.is_set()

    @contextmanager
    def silence_watchdog(self, limit: float) -> Iterator[trio.CancelScope]:
        """A cancel scope that fires once no frame has arrived for ``limit`` seconds.

        Every inbound frame moves its deadline forward (trio applies a changed deadline at once),
        so waking costs nothing while frames flow and nothing is polled. Check
        ``scope.cancelled_caught`` afterwards to tell silence from a normal exit.
        """
        scope = trio.CancelScope(deadline=self.last_inbound + limit)
        watched = (scope, limit)
        self._watchdogs.append(watched)  # several may nest: a quiet one inside a dead one
        try:
            with scope:
                yield scope
        finally:
            self._watchdogs.remove(watched)

    async def _send(self, message: dict[str, Any]) -> None:
        """Send one frame, as ASCII: anything else is escaped (``\\u00e9``), so no string a
        client sent, however odd (a lone surrogate), can fail to encode on the way out.

        Raises:
            FrameTooLarge: over Deribit's 32 kB (escapes make a relayed request longer than it
                was locally); Deribit would answer it without an id, which ends the link.
                Nothing was sent.
        """
        text = json.dumps(message, separators=(",", ":"))
        if len(text) > MAX_FRAME_BYTES:  # ASCII: one byte per character
            raise FrameTooLarge(len(text))
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise self._lost(exc) from exc

    async def _read_frames(self) -> None:
        """Read frames until the link ends; raise ``SessionLost`` unless we ended it.

        A notification's ``Reply`` is sent before the next frame is read: while that send
        waits (the socket's buffer is full), nothing is read, and the silence watchdog, not
        an ever-growing queue, decides what a link that stopped reading our frames means.
        """
        try:
            with self._replies_due:
                while True:
                    reply = self._dispatch(await self._ws.get_message())
                    if reply is not None:
                        await self._send_reply(reply)
            if not self._closing:
                raise self._reply_overdue()
            self._end()
        except ConnectionClosed as exc:
            if not self._closing:
                self._end()
                raise self._lost(exc) from exc
            if exc.reason is not None and exc.reason.code == MESSAGE_TOO_BIG:
                self._spoiled = self._lost(exc)  # trio-websocket's close, not the server's
            self._end()
        except SessionLost as lost:
            if not self._closing:
                raise
            # Ending the link already: stop reading, and let a logout say it went wrong.
            self._spoiled = lost
            self._end()

    async def _send_reply(self, reply: Reply) -> None:
        request_id = next(self._ids)
        sent_at = trio.current_time()
        self._pending[request_id] = _Pending(reply.on_answer)
        self._replies[request_id] = (sent_at, reply.method)
        due = sent_at + self.request_timeout
        self._replies_due.deadline = min(self._replies_due.deadline, due)
        await self._send({"jsonrpc": "2.0", "id": request_id, "method": reply.method,
                          "params": dict(reply.params)})  # fmt: skip

    def _replied(self, request_id: int) -> None:
        """A reply's answer came: time it, and bound the reader by the next oldest one."""
        sent_at, method = self._replies.pop(request_id)
        if self._replies:  # rarely: a test_request came before the last one's answer
            oldest = min(sent for sent, _ in self._replies.values())
            self._replies_due.deadline = oldest + self.request_timeout
        else:
            self._replies_due.deadline = math.inf
        if self._on_request is not None:
            self._on_request(method, trio.current_time() - sent_at)

    def _reply_overdue(self) -> SessionLost:
        _, method = min(self._replies.values())
        limit = self.request_timeout
        return SessionLost("request_timeout", f"{method} unanswered after {limit:g}s")

    def _lost(self, exc: ConnectionClosed) -> SessionLost:
        """What the close means: after a 10028 answer (a relayed one, say), a rate limit."""
        lost = _closed(exc)
        if self._rate_limited:
            return ClosedAfterRateLimit(lost.reason, f"{lost.detail}, after a 10028 answer")
        return lost

    def _end(self) -> None:
        """The link is over: wake every request still waiting, so that none waits forever."""
        self._closed.set()
        for request_id, pending in list(self._pending.items()):
            if pending.on_answer is not None:
                del self._pending[request_id]
                pending.on_answer(None)
            else:
                pending.answered.set()

    def _dispatch(self, frame: str | bytes) -> Reply | None:
        """Route one frame: an answer to its request, a notification to the caller; return
        the request the notification calls for, if any."""
        now = self.last_inbound = trio.current_time()
        for scope, limit in self._watchdogs:
            scope.deadline = now + limit
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
            # The frame may hold a token: say how long it was, never what it said.
            raise SessionLost("malformed_frame", f"{len(frame)}-byte frame is not JSON") from None
        if not isinstance(message, dict):
            raise SessionLost("malformed_frame", f"frame is a JSON {type(message).__name__}")
        request_id = message.get("id")
        if request_id is not None:
            self._answer(request_id, message)
            return None
        if isinstance(method := message.get("method"), str):
            return self._on_notification(method, message.get("params"))
        if "error" in message:
            code, text = _error_fields(message["error"])
            raise SessionLost(
                "request_rejected", f"Deribit could not read a request: {code} {text}"
            )
        raise SessionLost("malformed_frame", "neither an answer nor a notification")

    def _answer(self, request_id: object, message: dict[str, Any]) -> None:
        if "error" in message and _error_fields(message["error"])[0] == ErrorCode.TOO_MANY_REQUESTS:
            self._rate_limited = True
        # An id we did not send, or one whose request timed out already, is ignored.
        if type(request_id) is not int:
            return
        pending = self._pending.get(request_id)
        if pending is None or pending.message is not None:
            return
        if pending.on_answer is not None:
            del self._pending[request_id]
            if request_id in self._replies:
                self._replied(request_id)
            pending.on_answer(message)
            return
        pending.message = message
        pending.answered.set()

    async def _shut_down(self, *, graceful: bool) -> None:
        """End the link: politely (close frame, bounded wait) or at once, without a handshake."""
        self._closing = True
        try:
            if graceful:
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self._ws.aclose(NORMAL_CLOSURE)
        finally:
            self._end()
            await trio.aclose_forcefully(self._stream)


async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
    """Wait for ``event``, then end the race ``scope`` belongs to."""
    await event.wait()
    scope.cancel()


def result_of(method: str, message: dict[str, Any]) -> Any:
    """The ``result`` of an answer to ``method``.

    Raises:
        RpcError: the answer is an error object.
        SessionLost: the answer is malformed (``malformed_frame``).
    """
    if "error" in message:
        code, text = _error_fields(message["error"])
        if code is None:
            raise SessionLost("malformed_frame", f"answer to {method} has a malformed error")
        raise RpcError(method, code, text)
    if "result" not in message:
        raise SessionLost("malformed_frame", f"answer to {method} has neither result nor error")
    return message["result"]


def _error_fields(error: object) -> tuple[int | None, str]:
    if not isinstance(error, dict) or type(error.get("code")) is not int:
        return None, ""
    message = error.get("message")
    return error["code"], message if isinstance(message, str) else ""


def _closed(exc: ConnectionClosed) -> SessionLost:
    reason = exc.reason
    if reason is None:
        return SessionLost("connection_dropped", "closed without a close reason")
    if reason.code == NORMAL_CLOSURE:
        return SessionLost("closed_by_server", f"close code {reason.code} {reason.reason or ''}")
    return SessionLost("connection_dropped", f"close code {reason.code} {reason.name}")


def _translate(error: BaseException) -> BaseException:
    """Say what a transport exception means for the session; leave anything else alone."""
    if isinstance(error, SessionLost):
        return error
    lost: SessionLost
    if isinstance(error, ConnectionRejected):
        lost = SessionLost("handshake_rejected", f"HTTP {error.status_code}")
    elif isinstance(error, HandshakeError):
        lost = SessionLost("handshake_failed", type(error).__name__)
    elif isinstance(error, h11.ProtocolError):
        # trio-websocket meets an upgrade answer that is not HTTP (or whose head is too big)
        # and, as if it were the server, tries to answer it: h11 refuses, from its reader.
        lost = SessionLost("handshake_failed", "the upgrade's answer is not valid HTTP")
    elif isinstance(error, ConnectionClosed):
        lost = _closed(error)
    elif isinstance(error, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
        lost = SessionLost("connection_dropped", f"{type(error).__name__}: {error}")
    else:
        return error
    lost.__cause__ = error
    return lost


def _explain(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Reduce the connection's nursery group to the one exception that says why it ended.

    Cancellations that merely followed the failure are dropped. Several losses at once (the
    reader and a request both noticed the close) are the same event: the first one speaks for all.
    A bug next to them keeps the whole group, so nothing unexpected is hidden.
    """
    every = leaves(group)
    meaningful = [_translate(e) for e in every if not isinstance(e, trio.Cancelled)]
    if not meaningful:
        return every[0] if len(every) == 1 else group
    if len(meaningful) == 1 or all(isinstance(e, SessionLost) for e in meaningful):
        return meaningful[0]
    # A bug among them: keep every meaningful error, but not the Cancelled ones. Trio's
    # cancellation is level-triggered, so the next checkpoint raises it again; kept here, it
    # would make a BaseExceptionGroup that the session's `except Exception` cannot contain.
    return BaseExceptionGroup("the connection failed", meaningful)


async def _connect(
    nursery: trio.Nursery, url: str, ssl_context: ssl.SSLContext | None
) -> tuple[WebSocketConnection, Stream]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise SessionLost("connect_failed", f"{host}:{port}: {exc}") from exc
    stream: Stream = tcp
    try:
        if secure:
            stream = trio.SSLStream(
                tcp, ssl_context or _default_ssl_context(), server_hostname=host,
                https_compatible=True,
            )  # fmt: skip
            # Handshake now, so that a certificate problem is reported as such, not as a timeout.
            await stream.do_handshake()
        host_header = host if parts.port is None else f"{host}:{port}"
        return await wrap_client_stream(nursery, stream, host_header, resource), stream
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise SessionLost("connect_failed", f"{host}:{port}: TLS: {cause}") from exc
    except BaseException:
        # Cancelled (the connect timeout) or anything else: never leak the socket.
        await trio.aclose_forcefully(stream)
        raise


@asynccontextmanager
async def open_rpc_connection(
    url: str,
    *,
    request_timeout: float,
    on_notification: OnNotification,
    ssl_context: ssl.SSLContext | None = None,
    on_request: OnRequest | None = None,
) -> AsyncIterator[RpcConnection]:
    """Connect to ``url`` and yield an ``RpcConnection``; end the link on the way out.

    ``on_request(method, seconds)`` is told how long each answered request took (for metrics).
    Connecting (TCP, TLS, WebSocket handshake) is bounded by ``request_timeout``. A normal exit
    closes politely; an exception or cancellation aborts the link at once, without waiting for a
    close handshake, which is what a dead link calls for.

    Raises:
        SessionLost: the link could not be opened or ended on its own; ``reason`` says why.
    """
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(request_timeout) as connecting:
                ws, stream = await _connect(nursery, url, ssl_context)
            if connecting.cancelled_caught:
                raise SessionLost("connect_timeout", f"no WebSocket after {request_timeout:g}s")
            conn = RpcConnection(
                ws,
                stream,
                on_notification=on_notification,
                request_timeout=request_timeout,
                on_request=on_request,
            )
            nursery.start_soon(conn._read_frames)
            graceful = False
            try:
                yield conn
                graceful = True
            finally:
                await conn._shut_down(graceful=graceful)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _explain(group)  # noqa: B904 (the group is its context; each leaf keeps its cause)
