"""HTTP on the simulator's one port: telling a WebSocket handshake from a plain request, and
serving one TCP connection's plain HTTP requests, keep-alive included.

Deribit answers its API over HTTP on the same host as its WebSocket (../shared/deribit-protocol.md,
"The same API over HTTP"), so the simulator reads the head of every new connection's first request
with h11 itself, before trio-websocket sees a byte: a WebSocket upgrade gets those bytes replayed
(``ReplayStream``) and goes on as before, anything else is served here. h11 does the parsing and
the framing; what a request means is the caller's (``HttpCalls`` in ``http_calls``).

What a client can make the simulator hold is bounded: a head of at most MAX_HEAD_BYTES (more is
431), a body of at most MAX_BODY_BYTES (more is answered -32600, as Deribit does, and the
connection closed), one request at a time. Every wait is bounded too: a request must arrive in
full within ``request_timeout`` of its first byte (the first one within that of the accept), a
keep-alive connection may sit idle KEEPALIVE_IDLE_S between requests, and an answer must be taken
within SEND_TIMEOUT_S; whoever misses one is dropped without an answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Final

import h11
import trio

from deribit_keeper.protocol import MAX_FRAME_BYTES

MAX_HEAD_BYTES: Final = 16 * 1024  # h11's own default, and what wsproto allows a handshake
MAX_BODY_BYTES: Final = MAX_FRAME_BYTES  # Deribit: larger requests get -32600
# (choice) Longer than aiohttp's 15 s keep-alive, so ccxt never reuses a connection we just shut.
KEEPALIVE_IDLE_S: Final = 60.0
SEND_TIMEOUT_S: Final = 10.0  # a client that does not read its answer is dropped
LINGER_S: Final = 1.0  # after a closing answer, how long unread input is drained (see _linger)
LINGER_BYTES: Final = 1024 * 1024
RECEIVE_BYTES: Final = 16 * 1024


class ReplayStream(trio.abc.Stream):
    """A stream that first yields bytes already read from ``stream``, then reads ``stream``.

    The head of a WebSocket handshake has been read (by ``read_head``) before trio-websocket
    gets the connection; this hands it the same bytes as if nobody had looked.
    """

    def __init__(self, stream: trio.abc.Stream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._replay:
            return bytes(await self._stream.receive_some(max_bytes))
        await trio.lowlevel.checkpoint()
        size = len(self._replay) if max_bytes is None else max_bytes
        data, self._replay = self._replay[:size], self._replay[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One complete request: what ``HttpCalls`` needs of it. ``repr`` hides the credential."""

    method: str  # upper case, as sent
    target: bytes  # path and ?query, exactly as sent (a signature covers it)
    authorization: str | None = field(repr=False)
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What to send back; ``close`` ends the connection after it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()


Answerer = Callable[[HttpRequest], Awaitable[HttpAnswer]]


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A request that asks to become a WebSocket: every byte of it read so far (to replay to
    trio-websocket, which parses the handshake itself), and when its handshake must be done."""

    raw: bytes = field(repr=False)
    deadline: float  # Trio time


def is_websocket_upgrade(request: h11.Request) -> bool:
    """Whether a request asks to become a WebSocket (``Upgrade: websocket``)."""
    upgrade = [value for name, value in request.headers if name == b"upgrade"]
    return any(b"websocket" in value.lower() for value in upgrade)


class HttpConnection:
    """Serves one TCP connection's plain HTTP requests, one after another, until it ends or one
    of them asks to become a WebSocket.

    Any request may be the upgrade, not only the first: aiohttp (so ccxt.pro) opens its
    WebSocket on a keep-alive connection its REST calls already used.

    Args:
        stream: the accepted TCP stream; the caller closes it once ``serve`` returns.
        answer: turns each complete request into its answer.
        request_timeout: how long a request may take to arrive once its first byte has.
    """

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, answer: Answerer, *, request_timeout: float
    ) -> None:
        self._stream = stream
        self._answer = answer
        self._request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"HttpConnection(request_timeout={self._request_timeout})"

    async def serve(self, *, deadline: float) -> Upgrade | None:
        """Answer requests, the first of which must arrive whole by ``deadline`` (Trio time).

        Returns None when the client closes, a wait times out, an answer closes the connection,
        or what arrived is not HTTP (answered 400, or 431 for a head over MAX_HEAD_BYTES); or the
        ``Upgrade`` of a request that asks to become a WebSocket, unanswered.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while True:
                head = await self._read_head(conn, deadline)
                if head is None:
                    return None
                request, raw, deadline = head
                if is_websocket_upgrade(request):
                    return Upgrade(raw, deadline)
                if not await self._serve_one(conn, request, deadline):
                    return None
                conn.start_next_cycle()
                deadline = trio.current_time() + KEEPALIVE_IDLE_S
        except h11.RemoteProtocolError as error:
            await _refuse(self._stream, conn, error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; there is nobody left to answer
        return None

    async def _serve_one(self, conn: h11.Connection, request: h11.Request, deadline: float) -> bool:
        """Read the body of ``request``, answer it; whether the connection may carry another."""
        body = await self._read_body(conn, request, deadline)
        if body is None:
            return False
        answer = await self._answer(self._request(request, body))
        if conn.their_state is not h11.DONE:  # the body was too large to read on
            answer = replace(answer, close=True)
        if not await self._send(conn, request, answer):
            return False
        if answer.close or conn.our_state is not h11.DONE:
            # our_state MUST_CLOSE: HTTP/1.0 or "Connection: close", so that was the last one
            await _linger(self._stream)
            return False
        return True

    async def _read_head(
        self, conn: h11.Connection, deadline: float
    ) -> tuple[h11.Request, bytes, float] | None:
        """The next request's head, its raw bytes (for an upgrade) and the deadline its whole
        request must meet: ``deadline`` for its first byte, then at most ``request_timeout``
        after that. None when the client closed or missed the deadline."""
        raw = bytearray(conn.trailing_data[0])  # what came in behind the previous request
        with trio.move_on_at(deadline) as scope:
            if raw:
                scope.deadline = min(deadline, trio.current_time() + self._request_timeout)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    return event, bytes(raw), scope.deadline
                if event is not h11.NEED_DATA:
                    return None  # the client closed between requests
                # Never more than h11's limit and a byte: past that, h11 refuses with 431.
                size = max(1, min(RECEIVE_BYTES, MAX_HEAD_BYTES + 1 - len(raw)))
                data = bytes(await self._stream.receive_some(size))
                if data and not raw:  # the first byte: from now on the request has its timeout
                    scope.deadline = min(deadline, trio.current_time() + self._request_timeout)
                raw += data
                conn.receive_data(data)
        return None

    @staticmethod
    def _request(request: h11.Request, body: bytes) -> HttpRequest:
        headers = dict(request.headers)  # names come lower case from h11; the last one wins
        authorization = headers.get(b"authorization")
        return HttpRequest(
            method=request.method.decode("ascii", "replace"),
            target=request.target,
            authorization=None if authorization is None else authorization.decode("latin-1"),
            body=body,
        )

    async def _read_body(
        self, conn: h11.Connection, request: h11.Request, deadline: float
    ) -> bytes | None:
        """The body of ``request`` by ``deadline``; None when the client left or was too slow,
        and then nothing is answered. A body over MAX_BODY_BYTES reads as one byte too many."""
        length = dict(request.headers).get(b"content-length")  # h11 checked it is all digits
        if length is not None and (len(length) > 9 or int(length) > MAX_BODY_BYTES):
            return bytes(MAX_BODY_BYTES + 1)  # answered -32600 without reading it at all
        if conn.they_are_waiting_for_100_continue:
            await self._send_bytes(
                conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        with trio.move_on_at(deadline):
            while True:
                event = await self._next_event(conn)
                if isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                if not isinstance(event, h11.Data):
                    return None  # the client closed mid-request
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return bytes(body)
        return None

    async def _next_event(self, conn: h11.Connection) -> object:
        """h11's next event (never NEED_DATA), reading as needed."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(bytes(await self._stream.receive_some(RECEIVE_BYTES)))

    async def _send(self, conn: h11.Connection, request: h11.Request, answer: HttpAnswer) -> bool:
        """Send ``answer`` whole; False if the client did not take it in time.

        The answer to a HEAD request has its headers only, as HTTP wants (h11 insists).
        """
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            *answer.headers,
        ]
        if answer.close:
            headers.append(("connection", "close"))
        response = h11.Response(
            status_code=answer.status, headers=headers, reason=_reason(answer.status)
        )
        body = b"" if request.method == b"HEAD" else answer.body
        data = conn.send(response) + conn.send(h11.Data(data=body))
        return await self._send_bytes(data + conn.send(h11.EndOfMessage()))

    async def _send_bytes(self, data: bytes) -> bool:
        with trio.move_on_after(SEND_TIMEOUT_S):
            await self._stream.send_all(data)
            return True
        return False


async def _refuse(
    stream: trio.abc.HalfCloseableStream, conn: h11.Connection, error: h11.RemoteProtocolError
) -> None:
    """Answer what h11 could not read (its status hint: 400, or 431 for a head too large),
    when h11 still lets us answer, then let the connection end."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{error}\n".encode()
    response = h11.Response(
        status_code=error.error_status_hint,
        reason=_reason(error.error_status_hint),
        headers=[
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ],
    )
    data = conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    try:
        with trio.move_on_after(SEND_TIMEOUT_S):
            await stream.send_all(data)
            await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _reason(status: int) -> bytes:
    """The standard reason phrase (``Bad Request``), which h11 leaves for us to give."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Close our half, then drain what the client still sends, within bounds.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    answer before the client reads it (a body too large, a request after "Connection: close").
    So the simulator stops sending, and discards input until the client closes, LINGER_BYTES
    have passed or LINGER_S are up.
    """
    drained = 0
    with trio.move_on_after(LINGER_S):
        try:
            await stream.send_eof()
            while drained < LINGER_BYTES:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "HttpAnswer",
    "HttpConnection",
    "HttpRequest",
    "ReplayStream",
    "Upgrade",
    "is_websocket_upgrade",
]
