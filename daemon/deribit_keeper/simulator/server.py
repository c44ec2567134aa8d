"""The Simulator: a Deribit WebSocket endpoint of our own, with an exchange and faults on demand.

It serves ``ws://host:port/ws/api/v2`` over plain TCP, one ``ConnectionHandler`` per accepted
WebSocket, and Deribit's HTTP API (``http://host:port/api/v2/{method}``, see ``http_calls``) on
the same port, and exposes what tests need to assert on (``connections``, ``issued_tokens``,
``account_cod``, ``orders``, ``open_orders``), to wait on (``wait_for``) and to break or drive
(``fail_next``, ``drop``, ``fill``, ...). It is also where order changes fan out to the
subscribed connections of their account, and where Cancel On Disconnect cancels a connection's
orders when it ends.

TCP is accepted with ``trio.serve_listeners`` and wrapped with trio-websocket's
``wrap_server_stream`` rather than handed to ``serve_websocket``: keeping the TCP stream is what
lets ``drop(conn, abrupt=True)`` end a connection without a close frame, and lets handshakes be
refused (``refuse_handshakes``, the per-IP limit) before a connection is counted. Before that,
``http.HttpConnection`` reads each request's head with h11: plain HTTP is answered there, and a
WebSocket upgrade (the first request or a later one on a keep-alive connection, as aiohttp
sends it) gets its bytes replayed to trio-websocket. **(choice)** Only WebSocket handshakes are
refused by ``refuse_handshakes`` and count against the per-IP limit (the sheet documents both for
handshakes).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from deribit_keeper.protocol import MAX_CONNECTIONS_PER_IP

from .accounts import SimAccount
from .connection import CLOSE_TIMEOUT_S, IDLE_TIMEOUT_S, ConnectionHandler, reset_on_close
from .exchange import Exchange
from .faults import Breakage, Faults, HandshakeBreak, HandshakeBreakage, Triggered
from .http import HttpConnection, ReplayStream
from .http_calls import HttpCalls
from .orders import Order, OrderBook, OrderEvent
from .records import SimConnection
from .session import Dispatcher
from .subscriptions import fan_out

API_PATH = "/ws/api/v2"
# A client that opens TCP but never finishes its handshake (or an HTTP request) is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# What ``break_handshakes`` sends: the first line of an acceptance, never followed by the rest;
# and a head far beyond any client's limit (h11 and wsproto allow 16 kB).
_HALF_HANDSHAKE: Final = b"HTTP/1.1 101 Switching Protocols\r\n"
_OVERSIZED_HEAD: Final = _HALF_HANDSHAKE + b"X-Filler: " + b"a" * 256 * 1024 + b"\r\n\r\n"
_NOT_HTTP: Final = b"this is not HTTP\r\n\r\n"

_log = structlog.get_logger()


class Simulator:
    """A Deribit JSON-RPC v2 WebSocket server for tests, the demo and users.

    Args:
        accounts: the API keys it accepts; client_ids must be unique.
        token_ttl_s: lifetime of access and refresh tokens (Trio time); ``expires_in`` reports it.
        wall_clock: epoch seconds, used only for signature timestamps and ``usIn``/``usOut``.
        host: the address to bind; a literal address is best (see ``serve``).
        max_connections_per_ip: open connections one IP may hold; the next handshake gets 429.

    Raises:
        ValueError: duplicate client_id, non-positive ``token_ttl_s`` or connection limit.
    """

    def __init__(
        self,
        accounts: Iterable[SimAccount],
        *,
        token_ttl_s: float = 900.0,
        wall_clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
    ) -> None:
        if max_connections_per_ip < 1:
            raise ValueError(f"max_connections_per_ip must be >= 1, got {max_connections_per_ip}")
        self._exchange = Exchange(accounts, token_ttl_s=token_ttl_s)
        self._faults = Faults()
        self._book = OrderBook()
        self._dispatcher = Dispatcher(self._exchange, self._faults, self._book)
        self._wall_clock = wall_clock
        self._http = HttpCalls(
            dispatcher=self._dispatcher,
            exchange=self._exchange,
            faults=self._faults,
            wall_clock=wall_clock,
            publish=self._publish,
            arrived=self._http_request_arrived,
        )
        self._host = host
        self._max_per_ip = max_connections_per_ip
        self._port: int | None = None
        self._open_per_ip: Counter[str] = Counter()
        self._live: dict[int, ConnectionHandler] = {}
        self._changed = trio.Event()
        self.connections: list[SimConnection] = []
        self.rejected_handshakes: list[int] = []  # HTTP status of every refused handshake
        # (method, params) of every HTTP request read as JSON-RPC, in arrival order; like
        # SimConnection.requests, its params may hold a secret, so repr never shows it.
        self.http_requests: list[tuple[str, dict[str, Any]]] = []

    def __repr__(self) -> str:
        where = self.url if self._port is not None else f"{self._host} (not serving)"
        names = [account.name for account in self._exchange.accounts]
        return f"Simulator({where}, accounts={names!r}, connections={len(self.connections)})"

    @property
    def url(self) -> str:
        """``ws://host:port/ws/api/v2``, valid once ``serve`` has started.

        Raises:
            RuntimeError: ``serve`` has not bound a port yet.
        """
        if self._port is None:
            raise RuntimeError("the simulator is not serving yet: start sim.serve first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self._port}{API_PATH}"

    @property
    def http_url(self) -> str:
        """``http://host:port``, the base of the HTTP API (``/api/v2/{method}``), once serving.

        Raises:
            RuntimeError: ``serve`` has not bound a port yet.
        """
        return "http" + self.url.removeprefix("ws").removesuffix(API_PATH)

    @property
    def triggered(self) -> list[Triggered]:
        """Every armed fault that took effect, in order, with the Trio time it did: the moment
        a test measures a client's detection time from."""
        return self._faults.triggered

    @property
    def issued_tokens(self) -> list[str]:
        """Every access and refresh token ever issued, for tests that look for leaks."""
        return self._exchange.issued_tokens

    def account_cod(self, client_id: str) -> bool:
        """The stored account-level COD setting of ``client_id`` (KeyError if unknown)."""
        return self._exchange.account_cod(client_id)

    def set_account_cod(self, client_id: str, enabled: bool) -> None:
        """Change the stored account-level COD setting behind every client's back, as the web UI
        or another tool can (KeyError if unknown); open connections keep their own."""
        self._exchange.set_account_cod(client_id, enabled)

    def orders(self, client_id: str, *, conn: SimConnection | None = None) -> list[dict[str, Any]]:
        """Every order of ``client_id`` in any state, oldest first, as Deribit shows them.

        With ``conn``, only the orders that connection created. The dicts are fresh copies.

        Raises:
            KeyError: no account has this client_id.
        """
        return [order.wire() for order in self._orders_of(client_id, conn)]

    def open_orders(
        self, client_id: str, *, conn: SimConnection | None = None
    ) -> list[dict[str, Any]]:
        """Like ``orders``, but only those still open."""
        return [order.wire() for order in self._orders_of(client_id, conn) if order.is_open]

    def order_summaries(self, client_id: str) -> list[tuple[str, str, bool, int | None]]:
        """``(order_id, label, open, connection id)`` of every order of ``client_id``, oldest
        first (connection None: placed over HTTP): for a check that walks a long soak's orders
        often, where building each order's whole wire form would be most of its cost.

        Raises:
            KeyError: no account has this client_id.
        """
        return [
            (o.order_id, o.label, o.is_open, o.conn_id) for o in self._orders_of(client_id, None)
        ]

    def _orders_of(self, client_id: str, conn: SimConnection | None) -> list[Order]:
        if all(account.client_id != client_id for account in self._exchange.accounts):
            raise KeyError(client_id)
        return self._book.orders(
            lambda o: o.client_id == client_id and (conn is None or o.conn_id == conn.id)
        )

    async def serve(
        self, port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (0 for any free port) until cancelled.

        Reports the bound port through ``task_status``: ``port = await nursery.start(sim.serve)``.
        When ``host`` resolves to several addresses only the first is served, so that port 0
        yields one port and one URL. On cancellation every open connection ends abruptly (the
        record says closed by the server, no close frame), as when a real server dies.
        """
        if self._port is not None:
            raise RuntimeError("this simulator is already serving")
        listeners = await trio.open_tcp_listeners(port, host=self._host)
        for extra in listeners[1:]:
            await extra.aclose()
        listener = listeners[0]
        self._port = int(listener.socket.getsockname()[1])
        _log.info("simulator.listening", host=self._host, port=self._port)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_tcp, [listener])
            task_status.started(self._port)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true.

        It is re-checked after every change of simulator state (connection opened or closed,
        request recorded or answered, heartbeat sent, handshake refused, an order placed, changed
        or cancelled), never by polling; so it must depend only on simulator state. Wrap it in
        ``trio.fail_after`` to bound the wait.
        """
        while not predicate():
            await self._changed.wait()

    # Fault injection -------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        code: int,
        *,
        times: int = 1,
        close_after: bool = False,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (any connection) with error ``code``.

        With ``close_after`` the connection is closed (code 1000) right after the answer: how
        10028 ``too_many_requests`` terminates a session. ``message`` is needed only for a code
        Deribit's table here lacks (-32603 ``Internal error``, say).
        """
        self._faults.fail_next(method, code, times=times, close_after=close_after, message=message)

    def break_next(
        self,
        method: str,
        how: Breakage,
        *,
        code: int = 1000,
        frame: str | bytes = "",
        times: int = 1,
    ) -> None:
        """Instead of answering the next ``times`` calls of ``method`` (any connection), break
        that connection ``how``: ``close`` (a close frame with ``code``), ``eof`` (TCP closed
        without a close frame: the client sees 1006), ``reset`` (a TCP RST), ``silence`` (as
        ``go_silent``) or ``frame`` (send ``frame``, bytes as a binary frame, and no answer).
        """
        self._faults.break_next(method, how, code=code, frame=frame, times=times)

    def break_handshakes(self, n: int, how: HandshakeBreakage, *, seconds: float = 0.0) -> None:
        """Make the next ``n`` WebSocket handshakes go wrong ``how``, once their request is read:
        ``blackhole`` (never answered, TCP kept open), ``stall`` (the first line of a 101, then
        nothing), ``delay`` (answered after ``seconds``), ``reset`` (TCP RST), ``eof`` (TCP
        closed unanswered), ``garbage`` (bytes that are not HTTP) or ``oversized`` (a 101 whose
        head is 256 kB). A blackholed or stalled connection is held until the client leaves
        (or Deribit's 10-minute idle rule); a handshake broken this way is not counted in
        ``connections``.
        """
        self._faults.break_handshakes(n, how, seconds=seconds)

    def delay_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """Handle the next ``times`` calls of ``method`` only after ``seconds``.

        Other requests on the same connection are answered meanwhile, so answers come out of
        order.
        """
        self._faults.delay_next(method, seconds, times=times)

    def misreport_cod(self, *, times: int = 1) -> None:
        """Make the next get_cancel_on_disconnect answers say ``enabled: false``."""
        self._faults.misreport_cod(times=times)

    def refuse_handshakes(self, n: int, status: int = 429) -> None:
        """Reject the next ``n`` WebSocket handshakes with HTTP ``status``."""
        self._faults.refuse_handshakes(n, status)

    def fill(self, order_id: str) -> dict[str, Any]:
        """Play a counterparty: fill the open order ``order_id`` in full at its own price.

        Resting orders never trade otherwise (the simulated book never moves). Subscribers of
        the order's account hear of it on ``user.orders`` and ``user.portfolio`` as usual.
        Returns the filled order.

        Raises:
            KeyError: no order has this id.
            ValueError: the order is no longer open.
        """
        outcome = self._book.fill(order_id, wall_now=self._wall_clock())
        self._publish(outcome.events)
        return outcome.order

    async def drop(
        self, conn: SimConnection, *, abrupt: bool = False, code: int = 1000, reset: bool = False
    ) -> None:
        """End ``conn`` from the server side and return once it has ended.

        Clean: a close frame with ``code`` (1000 unless given). Abrupt: the TCP socket is closed
        with no close frame (the client sees 1006); ``reset`` makes that a TCP reset (RST).
        Does nothing if the connection has already ended.
        """
        handler = self._live.get(conn.id)
        if handler is None:
            return
        handler.request_close(code, abrupt=abrupt, reset=reset)
        await self.wait_for(lambda: not conn.open)

    def go_silent(self, conn: SimConnection) -> None:
        """From now on send nothing on ``conn`` and ignore what arrives; TCP stays open.

        Requests that arrive are still recorded in ``conn.requests``, but not handled.
        """
        handler = self._live.get(conn.id)
        if handler is not None:
            handler.go_silent()

    def suppress_test_requests(self, conn: SimConnection) -> None:
        """Keep answering on ``conn`` but send no more heartbeat test_requests."""
        handler = self._live.get(conn.id)
        if handler is not None:
            handler.suppress_test_requests()

    async def send_raw(self, conn: SimConnection, text: str | bytes) -> None:
        """Send an arbitrary frame on ``conn`` (garbage, unsolicited answers...); bytes are sent
        as a binary frame.

        Raises:
            ValueError: the connection has ended.
        """
        handler = self._live.get(conn.id)
        if handler is None:
            raise ValueError(f"connection {conn.id} has ended")
        try:
            await handler.send_raw(text)
        except ConnectionClosed as exc:
            raise ValueError(f"connection {conn.id} has ended") from exc

    # Serving ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every ``wait_for`` so it re-checks its predicate."""
        self._changed.set()
        self._changed = trio.Event()

    def _publish(self, events: Sequence[OrderEvent]) -> None:
        """Queue each order change on every open connection of its account that subscribed."""
        for handler in list(self._live.values()):
            record = handler.record
            if record.client_id is None or record.closed_by is not None:
                continue
            mine = [event for event in events if event.client_id == record.client_id]
            for channel, data in fan_out(record.channels, mine) if mine else ():
                handler.push(channel, data)
        self._notify()

    def _connection_ended(self, record: SimConnection) -> None:
        """Cancel On Disconnect: cancel the open orders this connection created, only those."""
        if not record.cod_fired:
            return
        events = self._book.cancel_where(
            lambda order: order.conn_id == record.id,
            reason="cancel_on_disconnect",
            wall_now=self._wall_clock(),
        )
        record.cod_cancelled = [event.order["order_id"] for event in events]
        if events:
            _log.info("simulator.cod_cancelled", conn=record.id, orders=record.cod_cancelled)
        self._publish(events)

    def _http_request_arrived(self, method: str, params: dict[str, Any]) -> None:
        self.http_requests.append((method, params))
        self._notify()

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        """Serve one accepted TCP stream: a WebSocket, or plain HTTP requests."""
        try:
            try:
                peer: Any = stream.socket.getpeername()
            except OSError:
                return  # the client vanished before we could even ask who it was
            http = HttpConnection(stream, self._http.answer, request_timeout=HANDSHAKE_TIMEOUT_S)
            upgrade = await http.serve(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S)
            broken = None if upgrade is None else self._faults.take_handshake_break()
            if broken is not None:
                self._faults.note(trio.current_time(), f"handshake {broken.how}")
                self._notify()
                if not await self._break_handshake(stream, broken):
                    return
            if upgrade is not None:
                replay = ReplayStream(stream, upgrade.raw)
                await self._handle_websocket(stream, replay, str(peer[0]), upgrade.deadline)
        finally:
            await trio.aclose_forcefully(stream)

    async def _break_handshake(self, stream: trio.SocketStream, broken: HandshakeBreak) -> bool:
        """Do what ``break_handshakes`` armed; True if the handshake should go on (a delay)."""
        try:
            if broken.how == "delay":
                await trio.sleep(broken.seconds)
                return True
            if broken.how == "reset":
                reset_on_close(stream)
            elif broken.how in ("garbage", "oversized"):
                await stream.send_all(_NOT_HTTP if broken.how == "garbage" else _OVERSIZED_HEAD)
            elif broken.how in ("blackhole", "stall"):
                if broken.how == "stall":
                    await stream.send_all(_HALF_HANDSHAKE)
                with trio.move_on_after(IDLE_TIMEOUT_S):
                    while await stream.receive_some():
                        pass  # whatever the client sends is ignored, until it leaves
        except trio.BrokenResourceError:
            pass  # the client left first: the fault has done its work
        return False

    async def _handle_websocket(
        self, stream: trio.SocketStream, replay: ReplayStream, ip: str, deadline: float
    ) -> None:
        """Run the handshake (its head replayed), then the connection."""
        async with trio.open_nursery() as nursery:
            request: WebSocketRequest | None = None
            with trio.move_on_at(deadline):
                request = await wrap_server_stream(nursery, replay)
            if request is not None and await self._handle_request(request, ip, stream):
                # trio-websocket's reader task ends with the close handshake; bound the wait.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            else:  # timed out or refused: nothing more to read; closing the socket says so
                nursery.cancel_scope.cancel()

    def _verdict(self, path: str, ip: str) -> int | None:
        """The HTTP status to refuse a handshake with, or None to accept it (and count it)."""
        status = self._faults.take_refusal()
        if status is not None:
            self._faults.note(trio.current_time(), f"refuse {status}")
            return status
        if path.split("?", 1)[0] != API_PATH:
            return 404  # (choice) Deribit serves the API only there
        if self._open_per_ip[ip] >= self._max_per_ip:
            return 429
        self._open_per_ip[ip] += 1
        return None

    async def _handle_request(
        self, request: WebSocketRequest, ip: str, stream: trio.abc.Stream
    ) -> bool:
        """Refuse the handshake, or accept it and serve the connection; False if refused."""
        status = self._verdict(request.path, ip)
        if status is not None:
            self.rejected_handshakes.append(status)
            self._notify()
            try:
                await request.reject(status)
            except ConnectionClosed:
                pass
            return False
        try:
            await self._run_connection(request, stream)
        finally:
            self._open_per_ip[ip] -= 1
            if not self._open_per_ip[ip]:
                del self._open_per_ip[ip]
        return True

    async def _run_connection(self, request: WebSocketRequest, stream: trio.abc.Stream) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        record = SimConnection(
            id=len(self.connections) + 1,
            opened_at=trio.current_time(),
            peer_port=_peer_port(stream),
        )
        handler = ConnectionHandler(
            record,
            ws,
            stream,
            dispatcher=self._dispatcher,
            faults=self._faults,
            wall_clock=self._wall_clock,
            notify=self._notify,
            publish=self._publish,
            on_end=self._connection_ended,
        )
        self.connections.append(record)
        self._live[record.id] = handler
        _log.info("simulator.connection_opened", conn=record.id)
        self._notify()
        try:
            await handler.run()
        finally:
            del self._live[record.id]


def _peer_port(stream: trio.abc.Stream) -> int | None:
    """The client's TCP port, or None when the stream is not a plain socket (or has gone)."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return int(stream.socket.getpeername()[1])
    except OSError:
        return None
