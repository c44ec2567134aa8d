"""Deribit's JSON-RPC envelope on the local hop: reading an engine's frames, writing answers.

The engine's client was written against Deribit, so the gateway reads and answers exactly as
Deribit does (../shared/deribit-protocol.md): the client's ``id`` comes back as sent, integer or
string; a frame that cannot be read as a request is answered without an ``id`` key; every answer
carries ``usIn``, ``usOut``, ``usDiff`` and ``testnet``; notifications carry none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from ..protocol import ERROR_MESSAGES, MAX_FRAME_BYTES, ErrorCode

NO_ID: Final[Any] = object()  # the request had no "id" key, so its answer has none either


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """One well-formed request from a local client."""

    id: Any  # echoed exactly as sent; NO_ID when the frame had no "id"
    method: str
    params: dict[str, Any]


class LocalError(Exception):
    """A Deribit error to answer a local request with, instead of relaying it."""

    def __init__(self, code: int, data: dict[str, Any] | None = None) -> None:
        self.code = code
        self.data = data
        super().__init__(f"{code} {ERROR_MESSAGES.get(code, '')}")

    def error_object(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": ERROR_MESSAGES.get(self.code, "error"),
            "code": self.code,
        }
        if self.data is not None:
            body["data"] = self.data
        return body


def invalid(param: str, reason: str = "invalid format") -> LocalError:
    """-32602 naming the parameter, with Deribit's ``data`` shape."""
    return LocalError(ErrorCode.INVALID_PARAMS, {"reason": reason, "param": param})


class UnreadableFrame(Exception):
    """A frame that is not a request; answered with ``error`` and ``request_id``."""

    def __init__(self, error: LocalError, request_id: Any = NO_ID) -> None:
        self.error = error
        self.request_id = request_id
        super().__init__(str(error))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python accepts them, JSON does not


def parse_request(raw: str | bytes) -> LocalRequest:
    """Read one frame as a request, by the rules Deribit (and the simulator) apply.

    Binary frames are read as UTF-8 text. ``params`` absent or null counts as ``{}``.

    Raises:
        UnreadableFrame: -32600 for a frame over 32 kB and -32700 for one that is not JSON (both
            without ``id``); -32000 without ``id`` for JSON that is not an object with a string
            ``method``; -32602 (param ``params``, with the ``id``) when params is not an object.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_FRAME_BYTES:
        raise UnreadableFrame(LocalError(ErrorCode.REQUEST_TOO_LARGE))
    try:
        document = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise UnreadableFrame(LocalError(ErrorCode.PARSE_ERROR)) from None
    if not isinstance(document, dict) or not isinstance(document.get("method"), str):
        raise UnreadableFrame(LocalError(ErrorCode.MISSING_PARAMS))
    request_id = document.get("id", NO_ID)
    params = document.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise UnreadableFrame(invalid("params"), request_id)
    return LocalRequest(request_id, document["method"], params)


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"))


def answer_frame(
    request_id: Any, body: dict[str, Any], us_in: int, us_out: int, testnet: bool
) -> str:
    """An answer the gateway gives itself: ``body`` is ``{"result": ...}`` or ``{"error": ...}``."""
    frame: dict[str, Any] = {"jsonrpc": "2.0"}
    if request_id is not NO_ID:
        frame["id"] = request_id
    frame.update(body)
    frame.update({"usIn": us_in, "usOut": us_out, "usDiff": us_out - us_in, "testnet": testnet})
    return dumps(frame)


def relayed_frame(request_id: Any, answer: dict[str, Any]) -> str:
    """Deribit's own answer, unchanged but for the id: the client's own, as the client sent it."""
    if request_id is NO_ID:
        answer.pop("id", None)
    else:
        answer["id"] = request_id
    return dumps(answer)


def notification_frame(method: str, params: Any) -> str:
    return dumps({"jsonrpc": "2.0", "method": method, "params": params})


def get_str(params: dict[str, Any], name: str) -> str:
    """A required string param: -32000 when absent, -32602 when of another type."""
    if name not in params:
        raise LocalError(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if not isinstance(value, str):
        raise invalid(name)
    return value


def opt_str(params: dict[str, Any], name: str, default: str) -> str:
    return get_str(params, name) if name in params else default


def get_int(params: dict[str, Any], name: str) -> int:
    if name not in params:
        raise LocalError(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name)
    return value


def get_number(params: dict[str, Any], name: str) -> float:
    if name not in params:
        raise LocalError(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name)
    return float(value)


def get_choice(
    params: dict[str, Any], name: str, choices: tuple[str, ...], default: str | None = None
) -> str:
    value = get_str(params, name) if default is None else opt_str(params, name, default)
    if value not in choices:
        raise invalid(name, "invalid value")
    return value


def get_channels(params: dict[str, Any]) -> list[str]:
    """``channels``: a list of strings, for the subscribe methods."""
    if "channels" not in params:
        raise LocalError(ErrorCode.MISSING_PARAMS)
    channels = params["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise invalid("channels")
    return channels
