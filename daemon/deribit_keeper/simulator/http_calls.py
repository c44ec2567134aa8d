"""Deribit's API over HTTP, as the simulator answers it: one request, one JSON-RPC call.

``GET /api/v2/{method}?params`` and ``POST /api/v2[/{method}]`` with a JSON-RPC body are read by
``deribit_keeper.rest`` (shared with the gateway), then handled by the same ``Dispatcher`` as a
WebSocket's requests, with no connection behind them (../shared/deribit-protocol.md, "The same
API over HTTP"). So:

- A private method is authenticated by this request's ``Authorization`` header alone, a Bearer
  access token (issued by ``public/auth`` over either transport) or a ``deri-hmac-sha256``
  signature, checked by the exchange's one ``SignatureVerifier`` so nonces are shared with
  WebSocket auths. **(choice)** The header is read only for ``private/`` methods; a public
  method ignores it and uses up no nonce. A header that cannot be read, or a bad token or
  signature, is 13009; an unknown client id 13004.
- WebSocket-only methods (heartbeats, subscriptions, logout, COD with scope ``connection``) are
  refused with ``rest.websocket_only_fault()``, before any auth.
- An order placed here belongs to no connection, so Cancel On Disconnect never cancels it; its
  changes still reach the account's subscribed WebSockets on ``user.orders``.
- ``fail_next`` and ``delay_next`` apply as on a WebSocket (consumed on arrival); a failure armed
  with ``close_after`` closes the TCP connection after its answer.

**(choice)** A path outside ``/api/v2`` is 404, an HTTP method other than GET and POST 405; both
with an empty body, since they are not JSON-RPC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog
import trio

from deribit_keeper.jsonrpc import BadFrame, Request, RpcFault, error_frame, result_frame
from deribit_keeper.rest import (
    API_PREFIX,
    read_authorization,
    read_request,
    request_uri,
    websocket_only,
    websocket_only_fault,
)
from deribit_keeper.signatures import http_request_data

from .exchange import Exchange
from .faults import Faults
from .http import HttpAnswer, HttpRequest
from .orders import OrderEvent
from .records import Call, LinkState
from .session import Dispatcher

HTTP_METHODS: Final = ("GET", "POST")

_log = structlog.get_logger()


class HttpCalls:
    """Answers HTTP requests with the simulator's ``Dispatcher``.

    Args:
        dispatcher: answers well-formed requests, as for a WebSocket.
        exchange: checks ``Authorization`` headers.
        faults: the simulator-wide armed faults (failures and delays are consumed here).
        wall_clock: epoch seconds, for ``usIn``/``usOut`` and signature timestamps.
        publish: hands order changes to every subscribed connection of their accounts.
        arrived: told ``(method, params)`` of every request read as JSON-RPC, on arrival.
    """

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        exchange: Exchange,
        faults: Faults,
        wall_clock: Callable[[], float],
        publish: Callable[[Sequence[OrderEvent]], None],
        arrived: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._dispatcher = dispatcher
        self._exchange = exchange
        self._faults = faults
        self._wall_clock = wall_clock
        self._publish = publish
        self._arrived = arrived

    def __repr__(self) -> str:
        return f"HttpCalls({self._exchange!r})"

    async def answer(self, http: HttpRequest) -> HttpAnswer:
        """The answer to one complete HTTP request; a delayed call sleeps here first."""
        us_in = self._micros()
        raw_path, _, query = http.target.partition(b"?")
        path = raw_path.decode("latin-1")
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            return HttpAnswer(404, b"", content_type="text/plain")
        if http.method not in HTTP_METHODS:
            return HttpAnswer(
                405, b"", content_type="text/plain", headers=(("allow", "GET, POST"),)
            )
        try:
            request = read_request(http.method, path, query.decode("latin-1"), http.body)
        except BadFrame as bad:
            return self._error(bad.request_id, bad.fault, us_in)
        self._arrived(request.method, request.params)
        failure = self._faults.take_failure(request.method)
        delay = self._faults.take_delay(request.method)
        if delay > 0:
            await trio.sleep(delay)
        try:
            if failure is not None:
                raise RpcFault(failure.code)
            result = self._call(request, http, uri=request_uri(raw_path, query))
        except RpcFault as fault:
            answer = self._error(request.id, fault, us_in)
            if failure is not None and failure.close_after:
                return HttpAnswer(answer.status, answer.body, close=True)
            return answer
        frame = result_frame(request.id, result, us_in, self._micros())
        return HttpAnswer(200, frame.encode())

    def _call(self, request: Request, http: HttpRequest, *, uri: str) -> Any:
        """Dispatch one request with no connection behind it; its result.

        Raises:
            RpcFault: the error to answer with.
        """
        if websocket_only(request.method, request.params):
            raise websocket_only_fault()
        authorized_as = None
        if request.method.startswith("private/"):
            authorized_as = self._authorize(http, uri)
        call = Call(
            request.params,
            None,
            LinkState(),
            now=trio.current_time(),
            wall_now=self._wall_clock(),
            authorized_as=authorized_as,
        )
        reply = self._dispatcher.handle(request.method, call)
        if reply.events:
            self._publish(reply.events)
        _log.debug("simulator.http_call", method=request.method)
        return reply.result

    def _authorize(self, http: HttpRequest, uri: str) -> str | None:
        """The account the ``Authorization`` header proves, or None without one.

        Raises:
            RpcFault: 13009 for a header that is unreadable or does not prove an account; 13004
                for a signature by an unknown client id.
        """
        credential = read_authorization(http.authorization)
        if credential is None:
            return None
        body = http.body.decode("utf-8", "replace")  # not UTF-8: it cannot verify, nor parse
        return self._exchange.authorize_http(
            credential,
            http_request_data(http.method, uri, body),
            now=trio.current_time(),
            wall_now=self._wall_clock(),
        )

    def _error(self, request_id: Any, fault: RpcFault, us_in: int) -> HttpAnswer:
        """An error answer: status 400 and Deribit's error envelope (``id`` only if sent)."""
        frame = error_frame(request_id, fault, us_in, self._micros())
        return HttpAnswer(400, frame.encode())

    def _micros(self) -> int:
        return int(self._wall_clock() * 1_000_000)


__all__ = ["HttpCalls"]
