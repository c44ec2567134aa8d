"""The I/O side of one simulated connection: reading frames, answering, notifying, closing.

One ``ConnectionHandler`` runs per accepted WebSocket, inside its own nursery: a read loop, a
writer for its outbox of subscription notifications, a heartbeat task while heartbeats are on, a
ticker task while it holds a ticker channel, and a task per delayed answer. Answers go straight
to the socket; ``user.*`` notifications, which other connections' requests (or ends) cause, are
queued in the outbox so that whoever causes them never waits on this client's socket. So
**(choice)** a client must not rely on the order of an answer and the notifications the same
request caused, as with Deribit. Every way a connection can end goes through one of two doors,
so its ``SimConnection`` record is filled in exactly once:

- the server ends it: anything (idle timer, unanswered test_request, logout, a fault, ``drop``)
  calls ``request_close``; ``run`` performs that close and records it;
- the client ends it: the read loop sees ``ConnectionClosed`` that the server did not ask for.

If the handler is cancelled from outside (the simulator shutting down), the record says the
server ended it abruptly: the socket is closed without a close frame, as when a server dies.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, Literal

import structlog
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from deribit_keeper.jsonrpc import (
    BadFrame,
    Request,
    RpcFault,
    error_frame,
    notification_frame,
    parse_frame,
    result_frame,
)

from .faults import Break, Failure, Faults
from .market import ticker_object
from .orders import OrderEvent
from .records import Call, Effect, LinkState, SimConnection
from .session import Dispatcher
from .subscriptions import TICKER_INTERVAL_S, tickers

IDLE_TIMEOUT_S = 600.0  # Deribit closes a connection after 10 minutes without inbound traffic
CLOSE_TIMEOUT_S = 5.0  # how long a clean close waits for the client's close frame

_ABNORMAL_CLOSURE = 1006  # what trio-websocket reports when TCP ended without a close frame
_MESSAGE_TOO_BIG = 1009  # trio-websocket itself closed: a frame above its max_message_size

_log = structlog.get_logger()


class ConnectionHandler:
    """Serves one accepted WebSocket until it ends, keeping its ``SimConnection`` up to date.

    Args:
        record: the public record of this connection, updated in place.
        ws: the accepted WebSocket.
        stream: the TCP stream under ``ws``, closed directly for an abrupt close.
        dispatcher: answers well-formed requests.
        faults: the simulator-wide armed faults (failures and delays are consumed here).
        wall_clock: epoch seconds, for ``usIn``/``usOut``; durations use Trio time.
        notify: called after every change of state that ``Simulator.wait_for`` may be waiting on.
        publish: hands order changes to every subscribed connection of their accounts.
        on_end: called once, synchronously, the moment the connection's end is decided (after
            ``record`` says how); Cancel On Disconnect happens there.
    """

    def __init__(
        self,
        record: SimConnection,
        ws: WebSocketConnection,
        stream: trio.abc.Stream,
        *,
        dispatcher: Dispatcher,
        faults: Faults,
        wall_clock: Callable[[], float],
        notify: Callable[[], None],
        publish: Callable[[Sequence[OrderEvent]], None],
        on_end: Callable[[SimConnection], None],
    ) -> None:
        self.record = record
        self._ws = ws
        self._stream = stream
        self._dispatcher = dispatcher
        self._faults = faults
        self._wall_clock = wall_clock
        self._notify = notify
        self._publish = publish
        self._on_end = on_end
        self._link = LinkState()
        # Unbounded: what lands here was caused by requests, each adding a few frames at most.
        self._outbox_in, self._outbox_out = trio.open_memory_channel[str](math.inf)
        self._silent = False
        self._test_requests_suppressed = False
        self._close_requested = trio.Event()
        self._close_code = 1000
        self._close_abrupt = False
        self._close_reset = False
        self._heartbeat_scope: trio.CancelScope | None = None
        self._ticker_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"ConnectionHandler(id={self.record.id}, open={self.record.open})"

    @property
    def closing(self) -> bool:
        """True once the server decided to close; nothing more is answered after that."""
        return self._close_requested.is_set()

    def request_close(self, code: int = 1000, *, abrupt: bool = False, reset: bool = False) -> None:
        """Ask ``run`` to end the connection (idempotent: the first request wins).

        A clean close sends a close frame with ``code``; an abrupt one closes the TCP socket
        without one (a FIN), and ``reset`` makes that a TCP reset (RST) instead.
        """
        if self.closing or self.record.closed_by is not None:
            return
        self._close_code = code
        self._close_abrupt = abrupt or reset
        self._close_reset = reset
        self._close_requested.set()

    def go_silent(self) -> None:
        """From now on send nothing (no answers, heartbeats, idle close) and ignore requests."""
        self._silent = True

    def suppress_test_requests(self) -> None:
        """From now on send no test_requests (and so never close for an unanswered one)."""
        self._test_requests_suppressed = True

    def push(self, channel: str, data: Any) -> None:
        """Queue a subscription notification; dropped once the connection is ending."""
        if self.closing or self.record.closed_by is not None:
            return
        frame = notification_frame("subscription", {"channel": channel, "data": data})
        self._outbox_in.send_nowait(frame)

    async def send_raw(self, text: str | bytes) -> None:
        """Send any frame, even while silent (a fault is deliberate): bytes go as a binary frame.

        Raises:
            ConnectionClosed: the WebSocket is closed or closing.
        """
        await self._ws.send_message(text)

    async def run(self) -> None:
        """Serve until the connection ends; on return the record says how it ended."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop, nursery.cancel_scope)
                nursery.start_soon(self._write_outbox)
                await self._close_requested.wait()
                await self._close()
                nursery.cancel_scope.cancel()
        finally:
            self._finish()

    async def _close(self) -> None:
        self._record_end("server", None if self._close_abrupt else self._close_code)
        if self._close_abrupt:
            if self._close_reset:
                self.record.reset = True
                reset_on_close(self._stream)
            await trio.aclose_forcefully(self._stream)
            return
        # aclose sends the close frame and waits for the client's; on timeout it closes the
        # socket itself, which then counts as clean anyway: our side did the handshake's half.
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self._ws.aclose(self._close_code)

    def _record_end(self, closed_by: Literal["client", "server"], code: int | None) -> None:
        """Fill in how the connection ends, once, as soon as that is decided.

        ``cod_fired`` is decided here too: this is the moment Deribit would cancel the orders.
        ``code`` None means no close handshake (abrupt).
        """
        record = self.record
        record.closed_by = closed_by
        record.close_code = code
        record.abrupt = code is None
        record.cod_fired = record.cod_enabled and not record.logged_out
        self._on_end(record)

    def _finish(self) -> None:
        record = self.record
        if record.closed_by is None:  # cancelled from outside: the simulator is going away
            self._record_end("server", None)
        record.open = False
        record.closed_at = trio.current_time()
        _log.info(
            "simulator.connection_closed",
            conn=record.id,
            closed_by=record.closed_by,
            code=record.close_code,
            abrupt=record.abrupt,
            cod_fired=record.cod_fired,
        )
        self._notify()

    def _client_closed(self, reason: CloseReason | None) -> None:
        """Record an end the server did not ask for."""
        code = int(reason.code) if reason is not None else _ABNORMAL_CLOSURE
        self._record_end(
            "server" if code == _MESSAGE_TOO_BIG else "client",
            None if code == _ABNORMAL_CLOSURE else code,
        )

    async def _read_loop(self, connection_scope: trio.CancelScope) -> None:
        while True:
            # Deribit's 10-minute rule; a silent server has stopped acting, so no timer then.
            deadline = math.inf if self._silent else trio.current_time() + IDLE_TIMEOUT_S
            with trio.move_on_at(deadline) as idle:
                try:
                    raw = await self._ws.get_message()
                except ConnectionClosed as exc:
                    if not self.closing:
                        self._client_closed(exc.reason)
                        connection_scope.cancel()
                    return
            if idle.cancelled_caught:
                if not self._silent:
                    self.request_close(1000)
                continue
            if not self.closing:
                await self._on_frame(raw)

    async def _on_frame(self, raw: str | bytes) -> None:
        us_in = self._micros()
        try:
            request = parse_frame(raw)
        except BadFrame as bad:
            if not self._silent:
                await self._send(error_frame(bad.request_id, bad.fault, us_in, self._micros()))
            return
        self.record.requests.append((request.method, request.params))
        self._notify()
        if self._silent:
            return
        # Faults are consumed on arrival, so "the next N calls" means the next N to arrive.
        broken = self._faults.take_break(request.method)
        if broken is not None:
            self._faults.note(trio.current_time(), f"break {broken.how}", self.record.id)
            await self._break(broken)
            return
        failure = self._faults.take_failure(request.method)
        delay = self._faults.take_delay(request.method)
        if failure is not None:
            self._faults.note(trio.current_time(), f"fail {failure.code}", self.record.id)
        if delay > 0:
            self._faults.note(trio.current_time(), f"delay {delay:g}s", self.record.id)
        if delay > 0 and self._nursery is not None:
            self._nursery.start_soon(self._answer, request, us_in, failure, delay)
        else:
            await self._answer(request, us_in, failure, 0.0)

    async def _break(self, broken: Break) -> None:
        """Break the connection instead of answering a request (``Faults.break_next``)."""
        if broken.how == "close":
            self.request_close(broken.code)
        elif broken.how in ("eof", "reset"):
            self.request_close(abrupt=True, reset=broken.how == "reset")
        elif broken.how == "silence":
            self.go_silent()
        else:
            try:
                await self.send_raw(broken.frame)
            except ConnectionClosed:
                pass  # the read loop sees the close and records it
        self._notify()

    async def _answer(
        self, request: Request, us_in: int, failure: Failure | None, delay: float
    ) -> None:
        """Handle one request and send its answer, unless the connection is ending.

        (choice) A delayed request is handled, not just answered, after the delay: it acts as
        if the server were slow, so e.g. a delayed public/auth authenticates only then.
        """
        if delay > 0:
            await trio.sleep(delay)
        if self.closing:
            return
        try:
            if failure is not None:
                if request.method == "public/test":
                    self._dispatcher.note_test_answer(self._link, self.record)
                raise failure.fault()
            call = Call(
                request.params,
                self.record,
                self._link,
                now=trio.current_time(),
                wall_now=self._wall_clock(),
            )
            reply = self._dispatcher.handle(request.method, call)
        except RpcFault as fault:
            await self._send(error_frame(request.id, fault, us_in, self._micros()))
            if failure is not None and failure.close_after:
                self.request_close(1000)
            self._notify()
            return
        if reply.events:
            self._publish(reply.events)
        if reply.effect is Effect.CLOSE_WITHOUT_ANSWER:
            self.request_close(1000)
        else:
            if reply.effect is Effect.HEARTBEAT_CHANGED:
                await self._restart_heartbeats()
            elif reply.effect is Effect.SUBSCRIPTIONS_CHANGED:
                await self._update_ticker()
            await self._send(result_frame(request.id, reply.result, us_in, self._micros()))
            for channel, data in reply.notices:
                self.push(channel, data)
        self._notify()

    async def _restart_heartbeats(self) -> None:
        if self._heartbeat_scope is not None:
            self._heartbeat_scope.cancel()
            self._heartbeat_scope = None
        interval = self.record.heartbeat_interval
        if interval is not None and self._nursery is not None:
            self._heartbeat_scope = await self._nursery.start(self._heartbeats, interval)

    async def _heartbeats(
        self, interval: float, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        """One test_request per interval; close when the previous one is still unanswered."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            due = trio.current_time()
            while True:
                due += interval
                await trio.sleep_until(due)
                if self._silent or self._test_requests_suppressed or self.closing:
                    continue
                if self._link.test_outstanding:
                    self.request_close(1000)
                    return
                self._link.test_outstanding = True
                self.record.test_requests_sent += 1
                await self._send(notification_frame("heartbeat", {"type": "test_request"}))
                self._notify()

    async def _update_ticker(self) -> None:
        """Run the ticker task exactly while the connection holds a ticker channel.

        Only then: a ticker that always ran would keep Trio's autojump clock busy forever.
        """
        wanted = bool(tickers(self.record.channels))
        if wanted and self._ticker_scope is None and self._nursery is not None:
            self._ticker_scope = await self._nursery.start(self._ticker)
        elif not wanted and self._ticker_scope is not None:
            self._ticker_scope.cancel()
            self._ticker_scope = None

    async def _ticker(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """Every TICKER_INTERVAL_S, one ticker per ticker channel held, at a steady pace."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            due = trio.current_time()
            while True:
                due += TICKER_INTERVAL_S
                await trio.sleep_until(due)
                if self.closing:
                    continue
                wall_now = self._wall_clock()
                for channel, instrument in tickers(self.record.channels):
                    data = ticker_object(instrument, wall_now=wall_now)
                    params = {"channel": channel, "data": data}
                    await self._send(notification_frame("subscription", params))

    async def _write_outbox(self) -> None:
        async for frame in self._outbox_out:
            await self._send(frame)

    async def _send(self, text: str) -> None:
        if self._silent:
            return
        try:
            await self._ws.send_message(text)
        except ConnectionClosed:
            pass  # the read loop sees the close and records it

    def _micros(self) -> int:
        return int(self._wall_clock() * 1_000_000)


def reset_on_close(stream: trio.abc.Stream) -> None:
    """Make closing ``stream``'s socket send a TCP reset (RST), not a FIN: SO_LINGER with a zero
    timeout, the one portable way to abort a TCP connection. A stream that is not a plain
    socket stream is left alone (it closes with a FIN)."""
    if isinstance(stream, trio.SocketStream):
        linger = struct.pack("ii", 1, 0)
        try:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass  # already gone: nothing left to reset
