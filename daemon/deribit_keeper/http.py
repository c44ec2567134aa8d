"""The operations endpoint: /healthz, /readyz, /status and /metrics over HTTP.

An ASGI app served by hypercorn's Trio worker inside the keeper's own Trio loop: hypercorn does
all the HTTP, the app only routes five paths. Every answer is built from what the sessions and
``KeeperMetrics`` already hold in memory, so a probe or a scrape never touches the network and
never waits on a session; polling it as often as a trading engine likes costs the links nothing.

Nothing served carries a secret or a token: ``Session.snapshot()`` holds none, and metric labels
are account names, scopes, states, reasons and method names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, Protocol

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from . import __version__, events
from .gateway import Gateway
from .logs import get_logger
from .metrics import KeeperMetrics
from .serving import lifespan, serve_asgi
from .session import Session, SessionState

HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
STATUS_PATH: Final = "/status"
METRICS_PATH: Final = "/metrics"

# Event names of this module (candidates for events.py).
HTTP_LISTENING: Final = events.HTTP_LISTENING
ALLOWED_METHODS: Final = ("GET", "HEAD")
JSON_TYPE: Final = "application/json"

_log = get_logger()


class StatusSource(Protocol):
    """What the endpoint reads: the Keeper implements it."""

    @property
    def sessions(self) -> Mapping[str, Session]: ...

    @property
    def metrics(self) -> KeeperMetrics: ...

    @property
    def gateways(self) -> Mapping[str, Gateway]: ...

    def alive(self) -> bool:
        """True while the supervisor loop runs and is not stopping."""
        ...


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


def _json(status: int, payload: Any) -> _Response:
    """A JSON answer that is also safe to show in a browser: ``<``, ``>`` and ``&`` escaped.

    An account name in a path is echoed back in a 404, so input reaches the body; JSON-encoding
    it, escaping HTML's metacharacters (as Go's encoding/json does) and ``nosniff`` keep it inert.
    """
    text = json.dumps(payload)
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return _Response(status, (text + "\n").encode())


class _App:
    """Five GET routes over a ``StatusSource``; HEAD answers the same without the body."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            # No WebSocket here: closing before accepting makes hypercorn answer 403.
            await send({"type": "websocket.close", "code": 1000, "reason": None})
            return
        answer = self._answer(scope["method"], scope["path"])
        headers = [
            (b"content-type", answer.content_type.encode()),
            (b"content-length", str(len(answer.body)).encode()),
            (b"cache-control", b"no-store"),  # state changes by the second
            (b"x-content-type-options", b"nosniff"),
            *answer.headers,
        ]
        # hypercorn drops the body of a HEAD answer and keeps its content-length.
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    def _answer(self, method: str, path: str) -> _Response:
        route = self._route(path)
        if route is None:
            return _json(404, {"error": "not found"})
        if method not in ALLOWED_METHODS:
            refused = _json(405, {"error": "method not allowed"})
            return replace(refused, headers=((b"allow", ", ".join(ALLOWED_METHODS).encode()),))
        return route()

    def _route(self, path: str) -> Callable[[], _Response] | None:
        if path == HEALTH_PATH:
            return self._health
        if path == READY_PATH:
            return partial(self._readiness, self._source.sessions)
        if path.startswith(READY_PATH + "/"):
            return partial(self._one_account, path.removeprefix(READY_PATH + "/"))
        if path == STATUS_PATH:
            return self._status
        if path == METRICS_PATH:
            return self._metrics
        return None

    def _health(self) -> _Response:
        alive = self._source.alive()
        return _json(200 if alive else 503, {"status": "ok" if alive else "stopping"})

    def _readiness(self, sessions: Mapping[str, Session]) -> _Response:
        # A stopping keeper is about to close its links: no longer a reason to start trading.
        ready = self._source.alive() and all(
            s.state is SessionState.READY for s in sessions.values()
        )
        states = {name: s.state.value for name, s in sessions.items()}
        return _json(200 if ready else 503, {"ready": ready, "accounts": states})

    def _one_account(self, name: str) -> _Response:
        session = self._source.sessions.get(name)
        if session is None:
            return _json(404, {"error": "unknown account", "account": name[:64]})
        return self._readiness({name: session})

    def _status(self) -> _Response:
        sessions = self._source.sessions
        gateways = self._source.gateways
        accounts = {name: s.snapshot() for name, s in sessions.items()}
        for name, account in accounts.items():
            gateway = gateways.get(name)
            account["gateway"] = None if gateway is None else gateway.snapshot()
        return _json(
            200,
            {
                "version": __version__,
                "alive": self._source.alive(),
                "ready": sum(a["ready"] for a in accounts.values()),
                "total": len(accounts),
                "accounts": accounts,
            },
        )

    def _metrics(self) -> _Response:
        body, content_type = self._source.metrics.render()
        return _Response(200, body, content_type)


def create_app(source: StatusSource) -> ASGIFramework:
    """The ASGI app answering /healthz, /readyz[/<account>], /status and /metrics."""
    return _App(source)


async def serve_http(
    app: ASGIFramework,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; report the bound port (0 picks one).

    ``port = await nursery.start(serve_http, app, "127.0.0.1", 0)``. Cancellation closes the
    listener and every open connection at once.

    Raises:
        OSError: the address cannot be bound (in use, not local, permission), before started.
    """

    def listening(bound: int) -> None:
        _log.info(HTTP_LISTENING, host=host, port=bound)

    await serve_asgi(app, host, port, listening=listening, task_status=task_status)
