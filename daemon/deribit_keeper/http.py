"""The operations endpoint: /healthz, /readyz, /status and /metrics over HTTP, the status page
at ``/`` (``status_page.py``), and the panic button ``POST /accounts/<name>/cancel-all``.

An ASGI app served by hypercorn's Trio worker inside the keeper's own Trio loop: hypercorn does
all the HTTP, the app only routes a few paths. Every GET answer is built from what the sessions
and ``KeeperMetrics`` already hold in memory, so a probe or a scrape never touches the network and
never waits on a session; polling it as often as a trading engine likes costs the links nothing.

The one route that acts, cancel-all, goes to Deribit over the account's own session (never a
connection of its own) and only for a caller holding the admin token (``http.admin_token_file``).

Nothing served carries a secret or a token: ``Session.snapshot()`` holds none, metric labels
are account names, scopes, states, reasons and method names, and the admin token is only ever
compared, never logged, echoed or put in an exception.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from . import __version__, events, status_page
from .config import KeeperConfig, Secret
from .errors import NotReady, RpcError, SessionLost
from .gateway import Gateway
from .logs import get_logger
from .metrics import KeeperMetrics
from .serving import lifespan, serve_asgi
from .session import Session, SessionState

PAGE_PATH: Final = "/"  # the status page, for people
HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
STATUS_PATH: Final = "/status"
METRICS_PATH: Final = "/metrics"
ACCOUNTS_PREFIX: Final = "/accounts/"
CANCEL_ALL_SUFFIX: Final = "/cancel-all"  # POST /accounts/<name>/cancel-all

# Event names of this module (candidates for events.py).
HTTP_LISTENING: Final = events.HTTP_LISTENING
KEEPER_CANCEL_ALL: Final = events.KEEPER_CANCEL_ALL
KEEPER_CANCEL_ALL_REFUSED: Final = events.KEEPER_CANCEL_ALL_REFUSED
KEEPER_CANCEL_ALL_FAILED: Final = events.KEEPER_CANCEL_ALL_FAILED
ALLOWED_METHODS: Final = ("GET", "HEAD")
ACTING_METHODS: Final = ("POST",)
JSON_TYPE: Final = "application/json"
# The CLI says it is the caller with this header (any other value, or none, is "http"). It is a
# label for the log, not a credential: the admin token is what authorises.
SOURCE_HEADER: Final = "x-deribit-keeper-source"
CLI_SOURCE: Final = "cli"
HTTP_SOURCE: Final = "http"
_NAME_ECHO_MAX: Final = 64  # a name from a path is caller input: echo and log a bounded part

AdminToken = Callable[[], Secret | None]

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


def _refuse_method(allowed: tuple[str, ...]) -> _Response:
    refused = _json(405, {"error": "method not allowed"})
    return replace(refused, headers=((b"allow", ", ".join(allowed).encode()),))


class _App:
    """Six GET routes over a ``StatusSource`` (HEAD answers the same without the body), and
    ``POST /accounts/<name>/cancel-all`` for a holder of the admin token."""

    def __init__(
        self, source: StatusSource, admin_token: AdminToken, wall_clock: Callable[[], float]
    ) -> None:
        self._source = source
        self._cancel_all = _CancelAll(source, admin_token)
        self._wall_clock = wall_clock
        # The Keeper builds its endpoint first thing in run(), so this is its uptime too.
        self._started = trio.current_time()

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
        answer = await self._answer(scope)
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

    async def _answer(self, scope: HTTPScope) -> _Response:
        account = _cancel_all_account(scope["path"])
        if account is not None:
            return await self._cancel_all.answer(scope, account)
        route = self._route(scope["path"])
        if route is None:
            return _json(404, {"error": "not found"})
        if scope["method"] not in ALLOWED_METHODS:
            return _refuse_method(ALLOWED_METHODS)
        return route()

    def _route(self, path: str) -> Callable[[], _Response] | None:
        if path == PAGE_PATH:
            return self._page
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

    def _status_document(self) -> dict[str, Any]:
        """What /status serves and the status page shows: every account's and gateway's
        snapshot, the ready count, and the keeper's version, uptime and shard.

        ``now`` is the wall clock the sessions stamp their times with, so that a reader works
        out "confirmed 12 s ago" against the keeper's clock, not its own.
        """
        sessions = self._source.sessions
        gateways = self._source.gateways
        accounts = {name: s.snapshot() for name, s in sessions.items()}
        for name, account in accounts.items():
            gateway = gateways.get(name)
            account["gateway"] = None if gateway is None else gateway.snapshot()
        shard = getattr(self._source, "shard", None)  # the Keeper's; a test's source has none
        return {
            "version": __version__,
            "alive": self._source.alive(),
            "ready": sum(a["ready"] for a in accounts.values()),
            "total": len(accounts),
            "now": _iso(self._wall_clock()),
            "uptime_s": round(trio.current_time() - self._started, 3),
            "shard": None if shard is None else str(shard),
            "accounts": accounts,
        }

    def _status(self) -> _Response:
        return _json(200, self._status_document())

    def _page(self) -> _Response:
        page = status_page.render(self._status_document())
        return _Response(200, page, status_page.CONTENT_TYPE, status_page.HEADERS)

    def _metrics(self) -> _Response:
        body, content_type = self._source.metrics.render()
        return _Response(200, body, content_type)


def _iso(wall: float) -> str:
    """A wall-clock time as the sessions' snapshots write theirs: ``2025-01-02T03:04:05.678Z``."""
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _cancel_all_account(path: str) -> str | None:
    """The account named by a ``/accounts/<name>/cancel-all`` path, else None (not this route)."""
    if not (path.startswith(ACCOUNTS_PREFIX) and path.endswith(CANCEL_ALL_SUFFIX)):
        return None
    name = path[len(ACCOUNTS_PREFIX) : -len(CANCEL_ALL_SUFFIX)]
    return name if name and "/" not in name else None


class _CancelAll:
    """``POST /accounts/<name>/cancel-all``: the panic button, over the account's own session.

    Checks go in the order that tells a caller least: the method (405 for any name, so it says
    nothing of accounts), then the admin token (401), and only then whether the account exists
    (404) and is ready (503, nothing sent). So nobody without the token learns account names.
    Every attempt is logged: done at WARNING (it cancels real orders), refused and failed too,
    with the caller's address for a refusal; never with the token.
    """

    def __init__(self, source: StatusSource, admin_token: AdminToken) -> None:
        self._source = source
        self._admin_token = admin_token

    async def answer(self, scope: HTTPScope, name: str) -> _Response:
        if scope["method"] not in ACTING_METHODS:
            return _refuse_method(ACTING_METHODS)
        source = _source_of(scope["headers"])
        refusal = _authenticate(scope["headers"], self._admin_token())
        if refusal is not None:
            client = scope.get("client")
            _log.warning(
                KEEPER_CANCEL_ALL_REFUSED,
                account=name[:_NAME_ECHO_MAX],
                source=source,
                reason=refusal.reason,
                client=None if client is None else client[0],
            )
            return refusal.response
        session = self._source.sessions.get(name)
        if session is None:
            echo = name[:_NAME_ECHO_MAX]
            return _failed(404, echo, source, "unknown account", "the keeper has no such account")
        return await self._cancel(session, name, source)

    async def _cancel(self, session: Session, name: str, source: str) -> _Response:
        """Send ``private/cancel_all`` and answer with the count, or why there is none.

        The call is shielded from cancellation (a caller hanging up, the keeper stopping) so that
        an order-cancelling request, once sent, always has its outcome logged; it stays bounded
        by the session's request timeout, and a link that ends wakes it at once.
        """
        try:
            with trio.CancelScope(shield=True):
                cancelled = await session.cancel_all()
        except NotReady as error:
            detail = f"{error}; nothing was sent"
            return _failed(503, name, source, "account not ready", detail, state=error.state)
        except RpcError as error:
            fields = {"code": error.code, "message": error.message}
            return _failed(502, name, source, "deribit refused", error.detail, **fields)
        except SessionLost as error:
            # Sent, but unanswered: the orders may or may not be cancelled. nginx's split: an
            # upstream that timed out is 504, one whose link ended is 502.
            status = 504 if error.reason == "request_timeout" else 502
            detail = f"{error.detail}; outcome unknown: check open orders or run cancel-all again"
            reason = error.reason
            return _failed(status, name, source, "no answer from deribit", detail, reason=reason)
        _log.warning(KEEPER_CANCEL_ALL, account=name, cancelled=cancelled, source=source)
        return _json(200, {"account": name, "cancelled": cancelled})


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str  # a stable slug for the log
    response: _Response


def _authenticate(
    headers: Iterable[tuple[bytes, bytes]], expected: Secret | None
) -> _Refusal | None:
    """None when the request carries ``Authorization: Bearer <the admin token>``; else why not.

    The comparison is hmac.compare_digest's, whose time does not depend on where the two differ.
    """
    if expected is None:
        detail = "cancel-all is disabled: the keeper has no http.admin_token_file"
        return _unauthorized("admin_token_not_configured", detail)
    presented = [value for key, value in headers if key == b"authorization"]
    scheme, _, token = presented[0].partition(b" ") if len(presented) == 1 else (b"", b"", b"")
    if scheme.lower() != b"bearer" or not token.strip():
        return _unauthorized("no_token", "send the admin token as Authorization: Bearer <token>")
    if not hmac.compare_digest(token.strip(), expected.reveal().encode()):
        return _unauthorized("wrong_token", "the admin token is not the keeper's", invalid=True)
    return None


def _unauthorized(reason: str, detail: str, *, invalid: bool = False) -> _Refusal:
    challenge = b'Bearer realm="deribit-keeper"' + (b', error="invalid_token"' if invalid else b"")
    answer = _json(401, {"error": "unauthorized", "detail": detail})
    return _Refusal(reason, replace(answer, headers=((b"www-authenticate", challenge),)))


def _failed(
    status: int, name: str, source: str, error: str, detail: str, **fields: Any
) -> _Response:
    """An authenticated cancel-all that did not happen, or whose outcome is unknown: logged
    (502/504 at ERROR: orders may still be open) and answered with ``error`` and ``detail``."""
    log = _log.error if status in (502, 504) else _log.warning
    log(KEEPER_CANCEL_ALL_FAILED, account=name, source=source, status=status, error=error, **fields)
    return _json(status, {"account": name, "error": error, "detail": detail, **fields})


def _source_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    said = [value for key, value in headers if key == SOURCE_HEADER.encode()]
    return CLI_SOURCE if said == [CLI_SOURCE.encode()] else HTTP_SOURCE


def _configured_admin_token(source: object) -> Secret | None:
    """The admin token of the config the source runs now (the Keeper's ``config.http``).

    Read on every request, so a reload that changes ``http.admin_token_file`` takes effect at
    once, as the CLI reads the file afresh each time.
    """
    config = getattr(source, "config", None)
    http = config.http if isinstance(config, KeeperConfig) else None
    return None if http is None else http.admin_token


def create_app(
    source: StatusSource,
    *,
    admin_token: AdminToken | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> ASGIFramework:
    """The ASGI app answering /, /healthz, /readyz[/<account>], /status, /metrics and
    ``POST /accounts/<account>/cancel-all``. Call it inside ``trio.run``: uptime counts from here.

    ``admin_token`` returns the token that unlocks cancel-all (None: refused), asked on every
    request; by default it is the one in the source's current config, if it has one.
    ``wall_clock`` is the sessions' (their snapshots' times are on it).
    """
    token = admin_token if admin_token is not None else partial(_configured_admin_token, source)
    return _App(source, token, wall_clock)


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
