"""One engine's WebSocket to the gateway: what the keeper answers itself, and what it relays.

A local link looks like a Deribit connection to the engine. The keeper answers the methods that
are about the link itself (auth, hello, test, heartbeats, the link's own COD, logout,
subscriptions) and relays everything else over the account's one upstream session, with the
engine's own request ids given back on the answers. Until the link authenticates, private
methods are refused (13009) and nothing is relayed.

Everything the link sends goes through one outbox, written by one task, so answers and
notifications leave in order and a notification fan-out never waits on a slow client: a client
whose outbox overflows is closed (it has stopped reading; local COD applies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from ..errors import FrameTooLarge, NotReady, SessionLost
from ..jsonrpc import (
    BadFrame,
    Request,
    RpcFault,
    error_frame,
    get_choice,
    get_number,
    get_str,
    invalid,
    notification_frame,
    parse_frame,
    result_frame,
)
from ..protocol import API_VERSION, HEARTBEAT_MIN_S, ErrorCode
from .frames import relayed_frame
from .local_auth import LocalGrant
from .orders import LinkOrders
from .policy import never_relayed

if TYPE_CHECKING:
    from .gateway import Gateway

OUTBOX_FRAMES: Final = 4096  # answers and notifications waiting for a slow client, at most
MAX_IN_FLIGHT: Final = 256  # relayed requests per link; beyond, the link is read no further
CLOSE_TIMEOUT_S: Final = 1.0  # a close frame to a client that stopped reading waits this long
COD_SCOPES: Final = ("connection", "account")
TEST_REQUEST: Final = notification_frame("heartbeat", {"type": "test_request"})
SUBSCRIBE_METHODS: Final = frozenset(
    {"public/subscribe", "private/subscribe", "public/unsubscribe", "private/unsubscribe"}
    | {"public/unsubscribe_all", "private/unsubscribe_all"}
)
QUEUED_CHANGES: Final = 64  # subscription changes waiting their turn; beyond, reading waits


class End(Enum):
    """Why a local link ended. Only ends the client caused fire local COD."""

    CLIENT_CLOSED = "client_closed"  # a close frame, a reset, or the TCP connection gone
    HEARTBEAT_MISSED = "heartbeat_missed"
    TOO_SLOW = "too_slow"  # the outbox overflowed: the client stopped reading
    LOGOUT = "logout"
    UPSTREAM_LOST = "upstream_lost"
    UPSTREAM_RESTARTED = "upstream_restarted"
    GATEWAY_STOPPED = "gateway_stopped"  # shutdown, or a reload that restarts the gateway
    INTERNAL_ERROR = "internal_error"  # a bug in the keeper ended the link (logged)

    @property
    def fires_cod(self) -> bool:
        """The link ended other than by logout or by the keeper's own decision."""
        return self in (End.CLIENT_CLOSED, End.HEARTBEAT_MISSED, End.TOO_SLOW, End.INTERNAL_ERROR)


@dataclass(frozen=True, slots=True)
class Closing:
    """How a link ended. ``code`` is the close code the keeper sent, None when the client
    ended it (hypercorn reports 1006 for a clean close and a reset alike, so it tells nothing)."""

    end: End
    code: int | None
    reason: str


class LocalLink:
    """State and conversation of one local WebSocket; ``serve`` runs it to its end."""

    def __init__(self, gateway: Gateway, link_id: int, peer: str, *, cod: bool) -> None:
        self.id = link_id
        self.peer = peer
        self.connected_since = gateway.wall_clock()
        self.client_id: str | None = None
        self.scope: str | None = None
        self.grant: LocalGrant | None = None
        self.cod = cod  # local Cancel-On-Disconnect: cancel this link's orders when it dies
        self.heartbeat_interval: float | None = None
        self.channels: set[str] = set()
        self.orders = LinkOrders()
        self.closing: Closing | None = None
        self._gateway = gateway
        self._outbox, self._outbox_out = trio.open_memory_channel[str](OUTBOX_FRAMES)
        self._in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        self._changes_in, self._changes_out = trio.open_memory_channel[tuple[Request, int]](
            QUEUED_CHANGES
        )
        self._test_outstanding = False
        self._heartbeat_scope: trio.CancelScope | None = None
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._local: dict[str, Callable[[Request], Any]] = {
            "public/auth": self._auth,
            "public/hello": self._hello,
            "public/test": self._test,
            "public/set_heartbeat": self._set_heartbeat,
            "public/disable_heartbeat": self._disable_heartbeat,
            "private/enable_cancel_on_disconnect": self._enable_cod,
            "private/disable_cancel_on_disconnect": self._disable_cod,
            "private/get_cancel_on_disconnect": self._get_cod,
            "private/logout": self._logout,
        }

    def __repr__(self) -> str:
        return f"<LocalLink {self.id} client={self.client_id} cod={self.cod}>"

    @property
    def authenticated(self) -> bool:
        """Whether private methods may be used: after a local auth, or always with auth none."""
        return self.client_id is not None or not self._gateway.auth.required

    def snapshot(self) -> dict[str, Any]:
        """What /status shows of this link; no token, no secret."""
        return {
            "id": self.id,
            "client_id": self.client_id,
            "peer": self.peer,
            "connected_since": _iso(self.connected_since),
            "cod": self.cod,
            "open_orders": len(self.orders),
            "subscriptions": sorted(self.channels),
        }

    def close(self, end: End, code: int | None, reason: str) -> None:
        """End the link with ``code`` (the first call wins); ``serve`` sends the close frame."""
        if self.closing is None:
            self.closing = Closing(end, code, reason)
        self._scope.cancel()

    def push(self, frame: str) -> None:
        """Queue a frame for the client; a client that stopped reading is closed."""
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            self.close(End.TOO_SLOW, 1008, "too slow: the client stopped reading")
        except trio.ClosedResourceError:
            pass  # the link has ended: nothing more reaches the client

    # ---- the conversation ---------------------------------------------------------------

    async def serve(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> Closing:
        """Read and answer until the link ends; return how it ended. The close frame, when
        the keeper ends the link, is sent here, bounded by CLOSE_TIMEOUT_S."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write, send)
            nursery.start_soon(self._change_subscriptions)
            with self._scope:
                await self._read(receive)
            nursery.cancel_scope.cancel()
        self._outbox.close()
        closing = self.closing or Closing(End.CLIENT_CLOSED, None, "closed by the client")
        if closing.code is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                scope.shield = True
                await send(
                    {"type": "websocket.close", "code": closing.code, "reason": closing.reason}
                )
        return closing

    async def _read(self, receive: ASGIReceiveCallable) -> None:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                self.close(End.CLIENT_CLOSED, None, "closed by the client")
                return
            if event["type"] == "websocket.receive":
                text = event.get("text")
                await self._on_frame(text if text is not None else event.get("bytes") or b"")

    async def _write(self, send: ASGISendCallable) -> None:
        async for frame in self._outbox_out:
            await send({"type": "websocket.send", "bytes": None, "text": frame})

    async def _change_subscriptions(self) -> None:
        """Subscription changes, one at a time and in this link's order, apart from the reader:
        one waits for Deribit's answer, and the reader must go on reading meanwhile (a
        ``public/test`` left unread would look like a dead client)."""
        async for request, us_in in self._changes_out:
            try:
                await self._gateway.fanout.change(self, request, us_in)
            except RpcFault as error:
                self.refuse(request.id, error, us_in)

    async def _on_frame(self, raw: str | bytes) -> None:
        us_in = self._gateway.micros()
        try:
            request = parse_frame(raw)
        except BadFrame as bad:
            self.refuse(bad.request_id, bad.fault, us_in)
            return
        try:
            await self._handle(request, us_in)
        except RpcFault as error:
            self.refuse(request.id, error, us_in)
        except Exception:  # noqa: BLE001 (one bad request must not end a link, nor skip its COD)
            self._gateway.unexpected_error(request.method)
            self.refuse(request.id, RpcFault(ErrorCode.BAD_REQUEST), us_in)

    async def _handle(self, request: Request, us_in: int) -> None:
        self._check_private(request)
        if never_relayed(request.method):
            raise RpcFault(ErrorCode.FORBIDDEN)
        handler = self._local.get(request.method)
        if handler is not None:
            result = handler(request)
            if result is _NO_ANSWER:
                return
            if result is not _RELAY:
                self.reply(request.id, result, us_in)
                return
        if request.method in SUBSCRIBE_METHODS:
            await self._changes_in.send((request, us_in))
        else:
            await self._relay(request)

    def reply(self, request_id: Any, result: Any, us_in: int) -> None:
        """An answer the keeper gives itself, in Deribit's envelope."""
        gateway = self._gateway
        self.push(
            result_frame(request_id, result, us_in, gateway.micros(), testnet=gateway.testnet)
        )

    def refuse(self, request_id: Any, fault: RpcFault, us_in: int) -> None:
        """An error answer of the keeper's own, in Deribit's envelope."""
        now, testnet = self._gateway.micros(), self._gateway.testnet
        self.push(error_frame(request_id, fault, us_in, now, testnet=testnet))

    def answer(self, request_id: Any, answer: dict[str, Any]) -> None:
        """Pass one of Deribit's answers on, under the client's own id."""
        self.push(relayed_frame(request_id, answer))

    def _check_private(self, request: Request) -> None:
        """A private method needs the link's auth, or a valid ``access_token`` of this gateway
        in its params. The token is removed from every request, public ones too: Deribit never
        sees a local token."""
        token = request.params.pop("access_token", None)
        if request.method.startswith("public/") or not self._gateway.auth.required:
            return  # anything but public/ needs auth, however it is spelt (Private/buy...)
        if token is not None:
            if not isinstance(token, str) or self._gateway.auth.client_of(token) is None:
                raise RpcFault(ErrorCode.UNAUTHORIZED)
        elif not self.authenticated:
            raise RpcFault(ErrorCode.UNAUTHORIZED)

    async def _relay(self, request: Request) -> None:
        """Send the request upstream now, in arrival order; its answer is passed on the moment
        it arrives, from the upstream reader (``_answered``), with no task of its own."""
        if not self._gateway.upstream_ready():
            self._gateway.refused(request.method)
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)
        await self._in_flight.acquire()
        # A buy, sell or edit is followed to its answer even if this link dies meanwhile:
        # local COD must learn the order's id to cancel it.
        placing, sent = self.orders.sending(request.method), trio.current_time()

        def on_answer(answer: dict[str, Any] | None) -> None:
            self._answered(request, placing, sent, answer)

        try:
            await self._gateway.relay(request.method, request.params, on_answer)
        except (NotReady, SessionLost):
            self._settle(placing)
            self._gateway.refused(request.method)
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE) from None
        except FrameTooLarge:
            self._settle(placing)
            raise RpcFault(ErrorCode.REQUEST_TOO_LARGE) from None
        except BaseException:
            self._settle(placing)
            raise

    def _answered(
        self, request: Request, placing: bool, sent: float, answer: dict[str, Any] | None
    ) -> None:
        """Deribit's answer to one relayed request (None: the upstream link died first, and
        this link is being closed with 1013)."""
        self._settle(placing)
        if answer is None:
            return
        self.orders.learn(request.method, answer.get("result"))
        self._gateway.relayed(request.method, answer, trio.current_time() - sent)
        self.answer(request.id, answer)

    def _settle(self, placing: bool) -> None:
        """One relayed request is over: free its slot; tell local COD if it placed an order."""
        self._in_flight.release()
        self.orders.settled(placing)
        if placing:
            self._gateway.order_settled()

    # ---- methods the keeper answers itself -------------------------------------------------

    def _auth(self, request: Request) -> Any:
        grant = self._gateway.auth.authenticate(request.params, wall_now=self._gateway.wall_clock())
        self.client_id, self.scope, self.grant = grant.client_id, grant.scope, grant
        self._gateway.authenticated(grant.client_id, grant.scope, transport="websocket")
        return grant.result()

    def _hello(self, request: Request) -> Any:
        return hello(request.params)

    def _test(self, request: Request) -> Any:
        self._test_outstanding = False  # any public/test answers the test_request
        return test(request.params)

    def _set_heartbeat(self, request: Request) -> Any:
        interval = get_number(request.params, "interval")
        if not math.isfinite(interval) or interval < HEARTBEAT_MIN_S:
            raise invalid("interval", f"must be at least {HEARTBEAT_MIN_S}")
        self._restart_heartbeats(interval)
        return "ok"

    def _disable_heartbeat(self, request: Request) -> Any:
        self._restart_heartbeats(None)
        return "ok"

    def _cod_scope(self, request: Request) -> str:
        return get_choice(request.params, "scope", COD_SCOPES, "connection")

    def _enable_cod(self, request: Request) -> Any:
        return self._set_cod(request, True)

    def _disable_cod(self, request: Request) -> Any:
        return self._set_cod(request, False)

    def _set_cod(self, request: Request, enabled: bool) -> Any:
        if self._cod_scope(request) == "account":
            return _RELAY
        self.cod = enabled
        return "ok"

    def _get_cod(self, request: Request) -> Any:
        if self._cod_scope(request) == "account":
            return _RELAY
        return {"scope": "connection", "enabled": self.cod}

    def _logout(self, request: Request) -> Any:
        """Deribit answers a logout by closing the link, and COD does not fire: the same here."""
        invalidate = request.params.get("invalidate_token", True)
        if not isinstance(invalidate, bool):
            raise invalid("invalidate_token")
        if invalidate and self.grant is not None:
            self._gateway.auth.revoke(self.grant)
        self.close(End.LOGOUT, 1000, "logout")
        return _NO_ANSWER

    # ---- local heartbeats ----------------------------------------------------------------------

    def _restart_heartbeats(self, interval: float | None) -> None:
        if self._heartbeat_scope is not None:
            self._heartbeat_scope.cancel()
            self._heartbeat_scope = None
        self.heartbeat_interval = interval
        self._test_outstanding = False
        if interval is not None and self._nursery is not None:
            self._heartbeat_scope = trio.CancelScope()
            self._nursery.start_soon(self._heartbeats, interval, self._heartbeat_scope)

    async def _heartbeats(self, interval: float, scope: trio.CancelScope) -> None:
        """One test_request per interval, as Deribit sends; the link is closed with 1000 when
        the previous one is still unanswered by the time the next is due."""
        with scope:
            due = trio.current_time()
            while True:
                due += interval
                await trio.sleep_until(due)
                if self._test_outstanding:
                    self.close(End.HEARTBEAT_MISSED, 1000, "heartbeat test_request unanswered")
                    return
                self._test_outstanding = True
                self.push(TEST_REQUEST)


def hello(params: dict[str, Any]) -> Any:
    """``public/hello``, answered by the gateway itself (over WebSocket and HTTP alike)."""
    get_str(params, "client_name")
    get_str(params, "client_version")
    return {"version": API_VERSION}


def test(params: dict[str, Any]) -> Any:
    """``public/test``, answered by the gateway itself: it tests the local hop."""
    if "expected_result" in params:
        get_choice(params, "expected_result", ("exception",))
        raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)  # as the simulator chooses
    return {"version": API_VERSION}


_NO_ANSWER: Final = object()  # a local method that answers by closing the link (logout)
_RELAY: Final = object()  # a local method that hands the request on (COD with scope account)


def _iso(wall: float) -> str:
    moment = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


__all__ = ["End", "LocalLink", "hello", "test"]
