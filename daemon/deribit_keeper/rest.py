"""Deribit's API over HTTP, as a server reads it: the request, its credentials, the answer.

Deribit serves every method at ``/api/v2/{method}`` too (../shared/deribit-protocol.md, "The same
API over HTTP"): params in the query string (GET) or a JSON-RPC body (POST), private methods
authenticated per request by an ``Authorization`` header, answers in the JSON-RPC envelope
without ``id`` and errors with HTTP status 400. Two servers speak it, the simulator (as Deribit)
and the gateway (as the engine's own Deribit), so the reading lives here once, below both, like
``jsonrpc.py``. Nothing here does I/O; the HTTP itself is hypercorn's or h11's.

A query string carries only text, while the WebSocket a request is relayed over carries JSON
types, and Deribit itself converts by each method's schema. (choice) The params that Deribit
types as numbers or booleans are converted by name (``amount=10`` -> ``10``, ``post_only=true``
-> ``true``); every other param stays a string, so an all-digit ``order_id``, ``label`` or
``nonce`` keeps its type. A value that does not convert stays a string and meets the method's
own -32602.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

from .jsonrpc import NO_ID, BadFrame, Request, RpcFault, parse_frame
from .protocol import MAX_FRAME_BYTES, ErrorCode

API_PREFIX: Final = "/api/v2"
HMAC_SCHEME: Final = "deri-hmac-sha256"
_DIGITS: Final = re.compile(r"[0-9]{1,18}")  # a timestamp in ms, never past int64
# Params Deribit's schemas type as numbers, and as booleans: converted from query strings.
NUMBER_PARAMS: Final = frozenset(
    {"amount", "contracts", "price", "trigger_price", "trigger_offset", "max_show", "interval"}
    | {"count", "offset", "depth", "timestamp", "start_timestamp", "end_timestamp"}
    | {"start_seq", "end_seq", "start_id", "end_id", "expires_in", "valid_until"}
)
BOOL_PARAMS: Final = frozenset(
    {"post_only", "reject_post_only", "reduce_only", "detailed", "mmp", "expired"}
    | {"include_old", "historical", "extended", "invalidate_token"}
)
# Methods only a WebSocket can serve: they are about a connection, and HTTP has none.
WEBSOCKET_ONLY: Final = frozenset(
    {"public/set_heartbeat", "public/disable_heartbeat", "private/logout"}
    | {"public/subscribe", "private/subscribe", "public/unsubscribe", "private/unsubscribe"}
    | {"public/unsubscribe_all", "private/unsubscribe_all"}
)
COD_METHODS: Final = frozenset(
    {"private/enable_cancel_on_disconnect", "private/disable_cancel_on_disconnect"}
    | {"private/get_cancel_on_disconnect"}
)


def websocket_only(method: str, params: dict[str, Any]) -> bool:
    """Whether HTTP must refuse ``method``: heartbeats, subscriptions, logout, and COD with scope
    ``connection`` (its default). COD with scope ``account`` is a stored setting, so it is not."""
    if method in COD_METHODS:
        return bool(params.get("scope", "connection") != "account")
    return method in WEBSOCKET_ONLY


def websocket_only_fault() -> RpcFault:
    """(choice) How a WebSocket-only method is refused over HTTP: -32601, as for a method the
    HTTP API does not have."""
    return RpcFault(ErrorCode.METHOD_NOT_FOUND)


def query_params(query: str) -> dict[str, Any]:
    """The params of a query string, typed as the module docstring says (the last of repeated
    keys wins)."""
    return {name: _typed(name, value) for name, value in parse_qsl(query, keep_blank_values=True)}


def _typed(name: str, value: str) -> Any:
    if name in BOOL_PARAMS and value in ("true", "false"):
        return value == "true"
    if name in NUMBER_PARAMS:
        try:
            number = json.loads(value)
        except ValueError:
            return value
        if isinstance(number, int | float) and not isinstance(number, bool):
            return number if math.isfinite(number) else value
    return value


def read_request(http_method: str, path: str, query: str, body: bytes) -> Request:
    """The JSON-RPC request an HTTP request stands for.

    ``GET /api/v2/{method}?params``; ``POST /api/v2/{method}`` or ``POST /api/v2`` with a
    JSON-RPC body (its ``method`` wins over the path's; its ``id``, if any, is echoed back).
    A POST without a body takes its params from the query string, as a GET.

    Raises:
        BadFrame: -32601 for a path that names no method, -32600 for a body over 32 kB
            (whatever the method), -32700 for a body that is not JSON, -32000/-32602 as
            ``parse_frame`` says.
    """
    method = path[len(API_PREFIX) + 1 :] if path.startswith(API_PREFIX + "/") else ""
    if len(body) > MAX_FRAME_BYTES:  # before anything else: 32 kB of blanks is still too large
        raise BadFrame(RpcFault(ErrorCode.REQUEST_TOO_LARGE))
    if http_method == "POST" and body.strip():
        document = _json_body(body)
        if not (isinstance(document, dict) and "method" not in document and method):
            return parse_frame(body)  # read as a WebSocket frame would be, byte for byte
        # Compact and unescaped, so the frame is about the body's size plus the method's name
        # (the body alone was checked against the limit above; parse_frame checks the frame).
        frame = json.dumps(
            {**document, "method": method}, separators=(",", ":"), ensure_ascii=False
        )
        try:
            return parse_frame(frame)
        except UnicodeEncodeError:  # a lone surrogate escaped in the body: not text
            raise BadFrame(RpcFault(ErrorCode.PARSE_ERROR)) from None
    if not method:
        raise BadFrame(RpcFault(ErrorCode.METHOD_NOT_FOUND))
    return Request(id=NO_ID, method=method, params=query_params(query))


def _json_body(body: bytes) -> Any:
    """The JSON document of a POST body, by ``parse_frame``'s rules (UTF-8, no NaN).

    Raises:
        BadFrame: -32700 for a body that is not JSON.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise BadFrame(RpcFault(ErrorCode.PARSE_ERROR)) from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class Bearer:
    """``Authorization: Bearer <token>``; ``repr`` hides the token."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Signed:
    """``Authorization: deri-hmac-sha256 id=...,ts=...,sig=...,nonce=...``."""

    client_id: str
    timestamp_ms: int
    nonce: str
    signature: str = field(repr=False)


def read_authorization(header: str | None) -> Bearer | Signed | None:
    """The credential an ``Authorization`` header holds, or None without one.

    Raises:
        RpcFault: 13009 for a header of another scheme, or one that cannot be read.
    """
    if header is None or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return Bearer(rest.strip())
    if scheme.lower() != HMAC_SCHEME:
        raise RpcFault(ErrorCode.UNAUTHORIZED)
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, equals, value = part.strip().partition("=")
        if not equals:
            raise RpcFault(ErrorCode.UNAUTHORIZED)
        fields[key.strip()] = value.strip()
    try:
        client_id, ts, nonce, sig = (fields[key] for key in ("id", "ts", "nonce", "sig"))
    except KeyError:
        raise RpcFault(ErrorCode.UNAUTHORIZED) from None
    # Digits only: int() would also take "+5", " 5" and "1_000", none of them a timestamp.
    if not client_id or _DIGITS.fullmatch(ts) is None:
        raise RpcFault(ErrorCode.UNAUTHORIZED)
    return Signed(client_id, int(ts), nonce, sig)


def request_uri(raw_path: bytes, query_string: bytes) -> str:
    """The URI a ``deri-hmac-sha256`` signature covers: the path as sent, with its ``?query``."""
    uri = raw_path.decode("latin-1")
    return f"{uri}?{query_string.decode('latin-1')}" if query_string else uri


def answer_status(answer: dict[str, Any]) -> int:
    """The HTTP status of an answer: 400 for an error, as Deribit's, else 200."""
    return 400 if "error" in answer else 200


def without_id(answer: dict[str, Any], request_id: Any) -> dict[str, Any]:
    """An answer as HTTP gives it: the client's own ``id`` if its POST body had one, else none."""
    shaped = {key: value for key, value in answer.items() if key != "id"}
    if request_id is not NO_ID:
        return {"jsonrpc": shaped.pop("jsonrpc", "2.0"), "id": request_id, **shaped}
    return shaped


__all__ = [
    "API_PREFIX",
    "Bearer",
    "Signed",
    "answer_status",
    "query_params",
    "read_authorization",
    "read_request",
    "request_uri",
    "websocket_only",
    "websocket_only_fault",
    "without_id",
]
