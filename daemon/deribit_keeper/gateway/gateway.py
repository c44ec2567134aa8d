"""One account's gateway: the trading engine's own Deribit, relayed over the protected session.

Deribit's Cancel-On-Disconnect cancels only the orders created on the connection that has it.
The gateway therefore lets the engine's unmodified Deribit client send its orders *through* the
keeper's own connection (COD confirmed on it), and keeps both hops honest:

* upstream: when the keeper's link to Deribit is lost, Deribit cancels every order that went
  through it, and the gateway closes every local link with 1013 ``upstream lost ...`` at once,
  so the engine resyncs exactly as if its own Deribit connection had died;
* local: a link with local COD on that dies (closed, reset, heartbeat missed) has its own open
  orders cancelled through the upstream connection; other links' orders stay.

It talks to Deribit only through the account's ``Session``, never with a connection of its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from .. import events
from ..config import AccountConfig, GatewayConfig
from ..errors import NotReady, SessionLost
from ..logs import get_logger
from ..protocol import ErrorCode
from ..rpc import OnAnswer, Relayed
from ..serving import serve_asgi
from ..session import Session
from .fanout import Fanout
from .http_api import HttpApi
from .link import CLOSE_TIMEOUT_S, Closing, End, LocalLink
from .listener import GatewayApp
from .local_auth import LocalAuth
from .orders import OPEN_STATES, LinkOrders

# (method, outcome, seconds) of every request the gateway relayed or refused; seconds is None
# for a refusal. Outcomes: "result", "error" (Deribit's), "unavailable" (13028, not sent).
OnRelayed = Callable[[str, str, float | None], None]
GatewayObserver = Callable[["Gateway", str, Mapping[str, Any]], None]

USER_ORDERS: Final = "user.orders."
STOP_GRACE_S: Final = CLOSE_TIMEOUT_S + 0.5  # links get this long to take their close frame
# How long local COD waits for the answers to orders still in flight when their link died;
# Deribit's silence would have ended the upstream link long before.
LATE_ORDER_S: Final = 60.0
COD_CANCELS_AT_ONCE: Final = 8  # local COD's cancels in flight at once
MAX_KNOWN_METHODS: Final = 1024  # Deribit has a few hundred; a bound all the same
BIND_RETRY_S: Final = 1.0  # a listen address in use is tried again after this, doubling...
BIND_RETRY_MAX_S: Final = 30.0  # ...up to this


class Gateway:
    """Serves ``ws://HOST:PORT/ws/api/v2`` for one account until ``stop()``."""

    def __init__(
        self,
        account: AccountConfig,
        config: GatewayConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        on_relayed: OnRelayed | None = None,
    ) -> None:
        self.account = account.name
        self.config = config
        self.auth = LocalAuth(config)
        self.fanout = Fanout(self)
        self.http_api = HttpApi(self)
        self.links: dict[int, LocalLink] = {}
        self.port: int | None = None  # the bound port, once listening
        self.testnet = account.environment != "prod"  # then whatever Deribit's answers say
        self.wall_clock = wall_clock
        self.request_timeout = account.request_timeout
        self._session: Session | None = None
        self._on_relayed = on_relayed
        self._observers: list[GatewayObserver] = []
        self._ids = itertools.count(1)
        # Orders each local client placed over HTTP: local COD cancels them with its last link.
        self.client_orders: dict[str, LinkOrders] = {}
        self._order_settled = trio.Event()
        self._upstream_served = False  # the session was ready since its last loss
        self._upstream_changed = trio.Event()  # set, and replaced, at each ready and each loss
        self._known_methods: set[str] = set()  # names Deribit answered as methods it has
        self._nursery: trio.Nursery | None = None
        self._stop: tuple[int, str] | None = None
        self._stop_requested = trio.Event()
        self._links_changed = trio.Event()
        self.listening = trio.Event()  # set once the port is bound and served
        self.stopped = trio.Event()  # set once run() has returned
        self._log = get_logger(account=account.name)

    def __repr__(self) -> str:
        return f"<Gateway {self.account} {self.config.bind} links={len(self.links)}>"

    # ---- what the supervisor, /status and /metrics use ------------------------------------

    def watch(self, observer: GatewayObserver) -> None:
        """Call ``observer(gateway, event, fields)`` for every ``gateway.*`` event it logs."""
        self._observers.append(observer)

    def attach(self, session: Session) -> None:
        """Relay through ``session`` from now on (the account's newest; older ones are ignored)."""
        self._detach()
        self._session = session
        self._upstream_served = session.ready
        session.watch(self._on_session_event)
        session.listen(self._on_notification)

    def _detach(self) -> None:
        """Let go of the current session: a stopped gateway must not stay one of its observers
        (a gateway restarted by every reload would pile them up)."""
        if self._session is not None:
            self._session.unwatch(self._on_session_event)
            self._session.unlisten(self._on_notification)

    def stop(self, code: int = 1001, reason: str = "keeper shutting down") -> None:
        """Close every link with ``code`` (local COD does not fire), then stop listening."""
        if self._stop is None:
            self._stop = (code, reason)
        self._close_all(End.GATEWAY_STOPPED, code, reason)
        self._stop_requested.set()

    def snapshot(self) -> dict[str, Any]:
        """What /status shows: the address and every local link; no secret, no token."""
        return {
            "listen": self.config.bind,
            "port": self.port,
            "listening": self.port is not None and self._stop is None,
            "links": [link.snapshot() for link in self.links.values()],
            "http_open_orders": {c: len(o) for c, o in sorted(self.client_orders.items()) if o},
            "upstream_channels": self.fanout.channels(),
        }

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called: this gateway is ending and will not serve again."""
        return self._stop is not None

    async def run(self) -> None:
        """Listen until ``stop()``, then give the links their close frames and return.

        A listen address that cannot be bound (in use, not local) is logged as
        ``gateway.listen_failed`` and retried with a doubling delay up to 30 s: it never takes
        the keeper or another account down. ``listening`` is set once it serves.
        """
        try:
            async with trio.open_nursery() as background:
                self._nursery = background
                async with trio.open_nursery() as server:
                    server.start_soon(self._listen)
                    await self._stop_requested.wait()
                    with trio.move_on_after(STOP_GRACE_S):
                        while self.links:
                            await self._links_changed.wait()
                    server.cancel_scope.cancel()
                # What is left (COD cancels, upstream unsubscribes) gets one request timeout.
                background.cancel_scope.deadline = trio.current_time() + self.request_timeout
        finally:
            self.port = None
            self._detach()
            self._emit(logging.INFO, events.GATEWAY_STOPPED, listen=self.config.bind)
            self.stopped.set()

    async def _listen(self) -> None:
        def listening(port: int) -> None:
            self.port = port
            self._emit(logging.INFO, events.GATEWAY_LISTENING, listen=self.config.bind, port=port)
            self.listening.set()

        app, delay = GatewayApp(self), BIND_RETRY_S
        while True:
            try:
                await serve_asgi(app, self.config.host, self.config.port, listening=listening)
                return
            except OSError as error:
                self._emit(
                    logging.ERROR,
                    events.GATEWAY_LISTEN_FAILED,
                    listen=self.config.bind,
                    error=str(error),
                    retry_in_s=delay,
                )
            await trio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX_S)

    # ---- what links and the fan-out use ---------------------------------------------------

    def micros(self) -> int:
        return int(self.wall_clock() * 1_000_000)

    def upstream_ready(self) -> bool:
        return self._session is not None and self._session.ready

    async def relay(
        self, method: str, params: Mapping[str, Any], on_answer: OnAnswer | None = None
    ) -> Relayed:
        """Send a request over the account's session (raises NotReady if it is not ready)."""
        if self._session is None:
            raise NotReady("starting")
        return await self._session.relay(method, params, on_answer)

    def relayed(self, method: str, answer: dict[str, Any], seconds: float) -> None:
        """Note one of Deribit's answers: metrics, and which orders it shows closed."""
        testnet = answer.get("testnet")
        if isinstance(testnet, bool):
            self.testnet = testnet
        error = answer.get("error")
        outcome = "error" if error is not None else "result"
        if isinstance(error, dict) and error.get("code") == ErrorCode.METHOD_NOT_FOUND:
            method = "other"  # no label value for every name a client makes up
        elif len(self._known_methods) < MAX_KNOWN_METHODS:
            self._known_methods.add(method)
        if outcome == "result" and not method.startswith(("private/buy", "private/sell")):
            for book in self._books():
                book.observe(answer.get("result"))
        self._count(method, outcome, seconds)

    def refused(self, method: str) -> None:
        # Only a name Deribit has answered becomes a label: a refusal proves nothing about it.
        self._count(method if method in self._known_methods else "other", "unavailable", None)

    def authenticated(self, client_id: str, scope: str, *, transport: str) -> None:
        self._emit(
            logging.INFO,
            events.GATEWAY_CLIENT_AUTHENTICATED,
            client_id=client_id,
            scope=scope,
            transport=transport,
        )

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn`` beside the links, outliving the link that asked (it bounds its own
        waits). Its bugs are logged and contained: they must not end the keeper."""
        if self._nursery is None:
            return

        async def contained() -> None:
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 (one account's gateway must not end the keeper)
                self.unexpected_error(getattr(fn, "__name__", "task"))

        self._nursery.start_soon(contained)

    def unexpected_error(self, where: str) -> None:
        """Log a bug met while handling ``where`` (a method, a task); call it from ``except``."""
        self._log.exception(events.GATEWAY_UNEXPECTED_ERROR, where=where)

    def admit(self, path: str) -> int | None:
        """The HTTP status to refuse a WebSocket handshake with, or None to accept it."""
        if path != "/ws/api/v2":
            return 404
        if self._stop is not None:
            return 503
        if len(self.links) >= self.config.max_clients:
            return 429
        return None

    async def run_link(
        self, peer: str, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one accepted local WebSocket to its end, then settle its orders."""
        link = LocalLink(self, next(self._ids), peer, cod=self.config.cancel_on_disconnect)
        self.links[link.id] = link
        self._changed()
        self._emit(logging.INFO, events.GATEWAY_CLIENT_CONNECTED, peer=peer, link=link.id)
        try:
            closing = await link.serve(receive, send)
        except Exception:  # noqa: BLE001 (a bug ends this link only, and its COD still applies)
            self.unexpected_error("link")
            closing = Closing(End.INTERNAL_ERROR, None, "internal error")
        finally:
            del self.links[link.id]
            self._changed()
            self.fanout.leave_all(link)
        open_orders = len(link.orders)
        self._emit(
            logging.INFO,
            events.GATEWAY_CLIENT_DISCONNECTED,
            client_id=link.client_id,
            link=link.id,
            reason=closing.end.value,
            code=closing.code,
            open_orders=open_orders,
        )
        books = self._books_to_cancel(link, closing)
        if any(len(book) or book.placing for book in books):
            self.spawn(self._fire_cod, link, books)

    def orders_of_client(self, client_id: str) -> LinkOrders:
        """The record of what ``client_id`` placed over HTTP (made on first use)."""
        book = self.client_orders.get(client_id)
        if book is None:
            book = self.client_orders[client_id] = LinkOrders()
        return book

    def order_settled(self) -> None:
        """A buy, sell or edit in flight has its answer (or never will): wake local COD."""
        self._order_settled.set()
        self._order_settled = trio.Event()

    def _books_to_cancel(self, link: LocalLink, closing: Closing) -> list[LinkOrders]:
        """What local COD cancels for a link that ended: its own orders if its COD is on, and
        with ``cancel_on_disconnect`` configured, its client's HTTP orders too when it was that
        client's last link (the engine is gone, whichever transport it placed with)."""
        if not (closing.end.fires_cod and link.cod):
            return []
        books = [link.orders]
        client = link.client_id
        others = any(other.client_id == client for other in self.links.values())
        if self.config.cancel_on_disconnect and client in self.client_orders and not others:
            books.append(self.client_orders[client].fork())  # not what it places from now on
        return books

    def _books(self) -> list[LinkOrders]:
        return [*(link.orders for link in self.links.values()), *self.client_orders.values()]

    # ---- the two hops' COD --------------------------------------------------------------------

    async def _fire_cod(self, link: LocalLink, books: list[LinkOrders]) -> None:
        """Cancel, through the upstream connection, every open order in ``books`` (what the
        dead ``link`` and, maybe, its client over HTTP created): the known ones at once, and
        those whose answers were still on their way as each answer arrives (for at most
        LATE_ORDER_S)."""
        cancelled, asked = 0, set[str]()
        # A burst of hundreds of cancels could meet Deribit's rate limit, whose 10028 ends the
        # session: every link's orders would go with it. A few at a time, each quick.
        pace = trio.Semaphore(COD_CANCELS_AT_ONCE)

        async def cancel(order_id: str) -> None:
            nonlocal cancelled
            async with pace:
                answer = await self._cancel_when_ready(order_id)
            if answer is None or "error" in answer:
                return
            result = answer.get("result")
            if isinstance(result, dict) and result.get("order_state") not in OPEN_STATES:
                cancelled += 1

        with trio.move_on_after(LATE_ORDER_S):
            async with trio.open_nursery() as cancels:
                while True:
                    for order_id in {i for book in books for i in book.open_ids()} - asked:
                        asked.add(order_id)
                        cancels.start_soon(cancel, order_id)
                    if not any(book.placing for book in books):
                        break
                    await self._order_settled.wait()
        self._emit(
            logging.WARNING,
            events.GATEWAY_COD_FIRED,
            client_id=link.client_id,
            link=link.id,
            cancelled=cancelled,
        )

    async def _cancel_when_ready(self, order_id: str) -> dict[str, Any] | None:
        """Deribit's answer to ``private/cancel`` of ``order_id``, or None if there is none to
        wait for: no upstream (Deribit's own COD cancelled what went through it), or no answer
        within the request timeout.

        A session repairing COD on the link that carried the order (not ready, not lost) is
        waited for: the order rests on a live link, and nothing else will cancel it.
        """
        while True:
            try:
                with trio.move_on_after(self.request_timeout):
                    relayed = await self.relay("private/cancel", {"order_id": order_id})
                    return await relayed.answer()
                return None
            except NotReady:
                if not self._upstream_served:
                    return None
                await self._upstream_changed.wait()
            except SessionLost:
                return None

    def _on_session_event(self, session: Session, event: str, fields: Mapping[str, Any]) -> None:
        if session is not self._session or self._stop is not None:
            return
        if event in (events.SESSION_READY, events.SESSION_LOST):
            changed, self._upstream_changed = self._upstream_changed, trio.Event()
            changed.set()
        if event == events.SESSION_READY:
            self._upstream_served = True
        elif event == events.SESSION_LOST and self._upstream_served:
            # Ready since the last loss, whatever state it was lost in (a COD repair that
            # failed is lost in enabling_cod): its orders and subscriptions went with it.
            self._upstream_served = False
            closed = self._close_all(End.UPSTREAM_LOST, 1013, f"upstream lost: {fields['reason']}")
            self.fanout.reset()
            self._forget_client_orders()
            self._emit(logging.WARNING, events.GATEWAY_UPSTREAM_LOST, clients_closed=closed)
        elif event == events.SESSION_STOPPING:
            self._close_all(End.UPSTREAM_RESTARTED, 1012, "upstream restarting")
            self.fanout.reset()
            self._forget_client_orders()

    def _forget_client_orders(self) -> None:
        """The upstream link ended without logout: Deribit's COD cancelled every order that
        went through it, HTTP ones included."""
        for book in self.client_orders.values():
            book.forget_all()

    def _on_notification(self, method: str, params: Any) -> None:
        if method != "subscription" or not isinstance(params, dict):
            return
        self.fanout.deliver(params)
        channel = params.get("channel")
        if isinstance(channel, str) and channel.startswith(USER_ORDERS):
            for book in self._books():
                book.observe(params.get("data"))

    def _close_all(self, end: End, code: int, reason: str) -> int:
        links = list(self.links.values())
        for link in links:
            link.close(end, code, reason)
        return len(links)

    def _changed(self) -> None:
        self._links_changed.set()
        self._links_changed = trio.Event()

    def _count(self, method: str, outcome: str, seconds: float | None) -> None:
        if self._on_relayed is None:
            return
        try:
            self._on_relayed(method, outcome, seconds)
        except Exception:  # noqa: BLE001 (metrics must never end a link)
            self._log.exception(events.GATEWAY_OBSERVER_FAILED, observed="relayed")

    def _emit(self, level: int, event: str, /, **fields: Any) -> None:
        self._log.log(level, event, **fields)
        for observer in self._observers:
            try:
                observer(self, event, fields)
            except Exception:  # noqa: BLE001 (metrics or status must never end a link)
                self._log.exception(events.GATEWAY_OBSERVER_FAILED, observed=event)
