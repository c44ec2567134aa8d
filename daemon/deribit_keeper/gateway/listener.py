"""The gateway's ASGI app: WebSocket on ``/ws/api/v2`` and HTTP on ``/api/v2``, one port.

hypercorn does the HTTP and WebSocket protocol work (HTTP/1.1, handshake, permessage-deflate,
framing, the 1 MiB frame cap); this app only decides whether to accept a handshake, hands each
accepted WebSocket to the gateway and each ``/api/v2`` request to its ``HttpApi``. A refused
handshake gets an HTTP status, as Deribit refuses a 33rd connection with 429: 404 for another
path, 429 past ``max_clients``, 503 while stopping.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
    WebsocketScope,
)

from ..rest import API_PREFIX
from ..serving import lifespan

if TYPE_CHECKING:
    from .gateway import Gateway

API_PATH: Final = "/ws/api/v2"
_REFUSALS: Final = {
    403: "refused: a request from a web page (Origin, Sec-Fetch-Site); engines send neither",
    404: "not found: the gateway serves ws://HOST:PORT/ws/api/v2 and http://HOST:PORT/api/v2",
    429: "too many local links: max_clients reached",
    503: "the gateway is stopping",
}


class GatewayApp:
    """Accepts or refuses each handshake; every accepted WebSocket becomes a ``LocalLink``."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:  # an answer racing hypercorn's close of the connection: serving.py drops it
            await self._http(scope, receive, send)

    async def _websocket(
        self, scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if _from_a_web_page(scope):
            await _refuse(send, 403)
            return
        status = self._gateway.admit(scope["path"])
        if status is not None:
            await _refuse(send, status)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "unknown"
        await self._gateway.run_link(peer, receive, send)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if _from_a_web_page(scope):
            await _answer(send, 403, _REFUSALS[403])
        elif scope["path"] == API_PREFIX or scope["path"].startswith(API_PREFIX + "/"):
            await self._gateway.http_api.serve(scope, receive, send)
        else:
            await _answer(send, 404, _REFUSALS[404])


def _from_a_web_page(scope: HTTPScope | WebsocketScope) -> bool:
    """Whether a browser sent this on a page's behalf. (choice) Refused on every gateway: any
    page the trader opens could otherwise send a plain GET (no CORS preflight) or open a
    WebSocket to loopback, and with ``auth: none`` place real orders. Trading engines' HTTP and
    WebSocket clients send neither header; ``Sec-Fetch-Site: none`` (typed by the user) is let
    through."""
    for name, value in scope["headers"]:
        key = name.lower()
        if key == b"origin" or (key == b"sec-fetch-site" and value.lower() != b"none"):
            return True
    return False


async def _refuse(send: ASGISendCallable, status: int) -> None:
    """Deny a handshake with ``status`` (the ASGI WebSocket denial response)."""
    body = json.dumps({"error": _REFUSALS[status]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def _answer(send: ASGISendCallable, status: int, error: str) -> None:
    """A plain HTTP answer, for anything that is not a WebSocket handshake."""
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
