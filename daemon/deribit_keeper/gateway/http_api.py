"""Deribit's HTTP API on the gateway's port, so REST clients' orders are protected too.

Many Deribit clients place, list and cancel orders over HTTP (ccxt trades only so), and an order
sent over HTTP to Deribit belongs to no connection: COD never cancels it. Here each such request
is relayed over the account's protected WebSocket session instead, so every order it creates is
created on the COD-confirmed upstream connection, exactly like the WebSocket links' orders.

Served as Deribit serves it (../shared/deribit-protocol.md, "The same API over HTTP"; reading in
``rest.py``): ``GET /api/v2/{method}?params`` or ``POST`` with a JSON-RPC body; private methods
authenticated per request against the gateway's own clients (``deri-hmac-sha256`` or
``Bearer`` with a token of this gateway); the answer is Deribit's envelope without ``id``, errors
with status 400. An order placed over HTTP belongs to the local client that signed it, for local
COD (``Gateway.client_orders``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from ..errors import FrameTooLarge, NotReady, SessionLost
from ..jsonrpc import (
    NO_ID,
    BadFrame,
    Request,
    RpcFault,
    dumps,
    error_frame,
)
from ..protocol import MAX_FRAME_BYTES, ErrorCode
from ..rest import (
    Bearer,
    Signed,
    answer_status,
    read_authorization,
    read_request,
    request_uri,
    websocket_only,
    websocket_only_fault,
    without_id,
)
from ..signatures import http_request_data
from .link import hello, test
from .policy import never_relayed

if TYPE_CHECKING:
    from .gateway import Gateway

HTTP_IN_FLIGHT: Final = 256  # relayed HTTP requests at once per gateway; more wait their turn
ALLOWED_METHODS: Final = ("GET", "POST")
_LOCAL: Final = {"public/hello": hello, "public/test": test}


class HttpApi:
    """Answers one gateway's HTTP requests: locally (auth, hello, test) or through the session."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._in_flight = trio.Semaphore(HTTP_IN_FLIGHT)

    async def serve(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Read one request, answer it, and write the answer."""
        us_in = self._gateway.micros()
        if scope["method"] not in ALLOWED_METHODS:
            await _send(send, 405, b'{"error":"method not allowed: use GET or POST"}', allow=True)
            return
        try:
            body = await _read_body(receive)
        except _ClientGone:
            return  # a request cut short is not the request its client meant: nothing is sent
        status, payload = await self._answer(scope, body, us_in)
        await _send(send, status, payload.encode())

    async def _answer(self, scope: HTTPScope, body: bytes | None, us_in: int) -> tuple[int, str]:
        request_id: Any = NO_ID
        try:
            if body is None:
                raise BadFrame(RpcFault(ErrorCode.REQUEST_TOO_LARGE))
            query = scope["query_string"].decode("latin-1")
            request = read_request(scope["method"], scope["path"], query, body)
            request_id = request.id
            answer = await self._handle(request, scope, body, us_in)
        except BadFrame as bad:
            return 400, self._error(bad.request_id, bad.fault, us_in)
        except RpcFault as fault:
            return 400, self._error(request_id, fault, us_in)
        except Exception:  # noqa: BLE001 (one bad request must not end the gateway)
            self._gateway.unexpected_error("http")
            return 400, self._error(request_id, RpcFault(ErrorCode.BAD_REQUEST), us_in)
        return answer_status(answer), dumps(without_id(answer, request_id))

    async def _handle(
        self, request: Request, scope: HTTPScope, body: bytes, us_in: int
    ) -> dict[str, Any]:
        gateway, method, params = self._gateway, request.method, request.params
        owner = self._authenticate(request, scope, body)
        if websocket_only(method, params):
            raise websocket_only_fault()
        if never_relayed(method):
            raise RpcFault(ErrorCode.FORBIDDEN)
        if method == "public/auth":
            grant = gateway.auth.authenticate(params, wall_now=gateway.wall_clock())
            gateway.authenticated(grant.client_id, grant.scope, transport="http")
            return self._result(grant.result(), us_in)
        local = _LOCAL.get(method)
        if local is not None:
            return self._result(local(params), us_in)
        return await self._relay(request, owner)

    def _authenticate(self, request: Request, scope: HTTPScope, body: bytes) -> str | None:
        """The local client a private request is made by (None for a public one, or with
        ``auth: none`` and no signature). ``access_token`` is taken out of every request:
        Deribit never sees a local token.

        Raises:
            RpcFault: 13009 without valid credentials; 13004 for an unknown client id.
        """
        auth = self._gateway.auth
        token = request.params.pop("access_token", None)
        if request.method.startswith("public/"):
            return None  # anything else needs credentials, however it is spelt
        if not auth.required:
            return None  # auth none: any id a header names is a claim, so orders belong to no one
        credential = read_authorization(_header(scope, b"authorization"))
        if credential is None and token is not None:
            credential = Bearer(token) if isinstance(token, str) else Bearer("")
        if isinstance(credential, Signed):
            data = http_request_data(
                scope["method"],
                request_uri(scope["raw_path"], scope["query_string"]),
                body.decode("utf-8", "replace"),
            )
            return auth.check_signed(credential, data, wall_now=self._gateway.wall_clock())
        if isinstance(credential, Bearer):
            client = auth.client_of(credential.token)
            if client is None:
                raise RpcFault(ErrorCode.UNAUTHORIZED)
            return client
        raise RpcFault(ErrorCode.UNAUTHORIZED)

    async def _relay(self, request: Request, owner: str | None) -> dict[str, Any]:
        """Send the request over the session and wait for Deribit's answer. An order's answer
        is recorded for its owner from the upstream reader, even if this HTTP client has gone
        by then: local COD must know the order either way."""
        gateway = self._gateway
        if not gateway.upstream_ready():
            gateway.refused(request.method)
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)
        book = None if owner is None else gateway.orders_of_client(owner)
        arrived = trio.Event()
        outcome: list[dict[str, Any] | None] = []

        def on_answer(answer: dict[str, Any] | None) -> None:
            if book is not None:
                result = None if answer is None else answer.get("result")
                book.answered(ticket, request.method, result)
                if ticket is not None:
                    gateway.order_settled()
            if answer is not None:
                gateway.relayed(request.method, answer, trio.current_time() - sent)
            outcome.append(answer)
            arrived.set()

        async with self._in_flight:
            ticket = None if book is None else book.send(request.method)
            sent = trio.current_time()
            try:
                await gateway.relay(request.method, request.params, on_answer)
            except (NotReady, SessionLost):
                on_answer(None)
                gateway.refused(request.method)
                raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE) from None
            except FrameTooLarge:
                on_answer(None)
                raise RpcFault(ErrorCode.REQUEST_TOO_LARGE) from None
            except BaseException:  # cancelled while sending: no answer will ever come
                on_answer(None)
                raise
            await arrived.wait()
        answer = outcome[0]
        if answer is None:  # the upstream link died first; Deribit's COD covers what it sent
            raise RpcFault(ErrorCode.TEMPORARILY_UNAVAILABLE)
        return answer

    def _result(self, result: Any, us_in: int) -> dict[str, Any]:
        """An answer the gateway gives itself, in Deribit's envelope."""
        us_out = self._gateway.micros()
        return {
            "jsonrpc": "2.0",
            "result": result,
            **{"usIn": us_in, "usOut": us_out, "usDiff": us_out - us_in},
            "testnet": self._gateway.testnet,
        }

    def _error(self, request_id: Any, fault: RpcFault, us_in: int) -> str:
        gateway = self._gateway
        return error_frame(request_id, fault, us_in, gateway.micros(), testnet=gateway.testnet)


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _ClientGone(Exception):
    """The client went away before its request's body was whole."""


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The request body, or None once it passes 32 kB (Deribit's limit): reading stops there.

    Raises:
        _ClientGone: the connection ended before the body did.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] != "http.request":
            raise _ClientGone  # http.disconnect before the body was whole
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > MAX_FRAME_BYTES:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def _send(send: ASGISendCallable, status: int, body: bytes, *, allow: bool = False) -> None:
    headers: Iterable[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *([(b"allow", b"GET, POST")] if allow else []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})
