"""Deribit's JSON-RPC framing as a server speaks it: reading frames and params, building answers.

Two servers speak it: the simulator (as Deribit) and the keeper's gateway (as the engine's own
Deribit). Both must read a client's frames by the same rules and answer with the envelope
Deribit's recorded traffic shows (../shared/deribit-protocol.md, "Message shapes"), so the rules
live here once, below both, beside ``protocol.py``. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from .protocol import ERROR_MESSAGES, MAX_FRAME_BYTES, ErrorCode


class _NoId(Enum):
    """Marks a frame whose answer must carry no ``id`` key at all (not even ``null``)."""

    NO_ID = "no id"


NO_ID: Final = _NoId.NO_ID


class RpcFault(Exception):
    """A Deribit error answer, raised where the problem is found and sent by the connection.

    Args:
        code: the Deribit error code; the message comes from ``ERROR_MESSAGES``.
        param: for -32602 only, the offending parameter (goes into ``data.param``).
        reason: for -32602 only, why it is wrong (goes into ``data.reason``).
    """

    def __init__(self, code: int, *, param: str | None = None, reason: str | None = None) -> None:
        if code not in ERROR_MESSAGES:
            raise ValueError(f"no Deribit message known for error code {code}")
        self.code = int(code)
        self.message = ERROR_MESSAGES[code]
        self.param = param
        self.reason = reason
        super().__init__(f"{self.code} {self.message}")

    def error_object(self) -> dict[str, Any]:
        """The ``error`` member: ``code`` and ``message``, plus ``data`` for -32602 only."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.code == ErrorCode.INVALID_PARAMS:
            error["data"] = {"reason": self.reason or "invalid format", "param": self.param}
        return error


def invalid(param: str, reason: str = "invalid format") -> RpcFault:
    """The -32602 answer for a parameter of the wrong type or value."""
    return RpcFault(ErrorCode.INVALID_PARAMS, param=param, reason=reason)


@dataclass(frozen=True, slots=True)
class Request:
    """A frame that reads as a JSON-RPC request: a method name and a params object."""

    id: Any  # echoed exactly as sent; NO_ID when the frame had no "id" key
    method: str
    params: dict[str, Any]


class BadFrame(Exception):
    """A frame that cannot be handled as a request; answered with ``fault`` and ``request_id``."""

    def __init__(self, fault: RpcFault, request_id: Any = NO_ID) -> None:
        self.fault = fault
        self.request_id = request_id
        super().__init__(str(fault))


def _reject_constant(name: str) -> Any:
    """Refuse NaN and Infinity: Python's json accepts them, JSON (and Deribit) do not."""
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """Refuse a number past a double's range (``1e999``) as NaN and Infinity are: Python reads it
    as inf and writes it back as ``Infinity``, which is not JSON. Echoed in an answer's id, or
    relayed in params to Deribit (whose -32700 without an id ends the upstream link), it
    would break a strict reader."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of a double's range")
    return number


def parse_frame(raw: str | bytes) -> Request:
    """Read one inbound frame as a request.

    (choice) Binary frames are read as UTF-8 text like text frames. Valid JSON that is not an
    object with a string ``method`` is answered -32000 ``Missing params`` without ``id``: the
    sheet's table gives -32600 the message "request entity too large", which would mislead here.
    ``params`` absent or ``null`` counts as ``{}``; ``jsonrpc`` is not checked. A number past a
    double's range (``1e999``) is not JSON here, as NaN and Infinity are not.

    Raises:
        BadFrame: -32600 for a frame over MAX_FRAME_BYTES, -32700 for anything that is not JSON
            (both without ``id``), -32000 as above, -32602 (param ``params``, with the request's
            ``id``) when ``params`` is not an object.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_FRAME_BYTES:
        raise BadFrame(RpcFault(ErrorCode.REQUEST_TOO_LARGE))
    try:
        document = json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadFrame(RpcFault(ErrorCode.PARSE_ERROR)) from None
    if not isinstance(document, dict) or not isinstance(document.get("method"), str):
        raise BadFrame(RpcFault(ErrorCode.MISSING_PARAMS))
    request_id = document.get("id", NO_ID)
    params = document.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadFrame(invalid("params"), request_id)
    return Request(id=request_id, method=document["method"], params=params)


def dumps(frame: dict[str, Any]) -> str:
    """Compact JSON, as Deribit sends it."""
    return json.dumps(frame, separators=(",", ":"))


def _envelope(request_id: Any, body: dict[str, Any], us_in: int, us_out: int, testnet: bool) -> str:
    frame: dict[str, Any] = {"jsonrpc": "2.0"}
    if request_id is not NO_ID:
        frame["id"] = request_id
    frame.update(body)
    frame.update({"usIn": us_in, "usOut": us_out, "usDiff": us_out - us_in, "testnet": testnet})
    return dumps(frame)


def result_frame(
    request_id: Any, result: Any, us_in: int, us_out: int, *, testnet: bool = True
) -> str:
    """A success answer with Deribit's envelope (``usIn``, ``usOut``, ``usDiff``, ``testnet``)."""
    return _envelope(request_id, {"result": result}, us_in, us_out, testnet)


def error_frame(
    request_id: Any, fault: RpcFault, us_in: int, us_out: int, *, testnet: bool = True
) -> str:
    """An error answer; ``request_id`` NO_ID leaves the ``id`` key out entirely."""
    return _envelope(request_id, {"error": fault.error_object()}, us_in, us_out, testnet)


def notification_frame(method: str, params: Any) -> str:
    """A server notification: no ``id``, and no ``usIn``/``usOut``/``testnet``."""
    return dumps({"jsonrpc": "2.0", "method": method, "params": params})


# Param readers. A missing param is -32000 "Missing params"; a present one of the wrong type or
# value is -32602 naming it. JSON booleans are not numbers here, though Python says they are ints.


def get_str(params: dict[str, Any], name: str) -> str:
    """A required string param."""
    if name not in params:
        raise RpcFault(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if not isinstance(value, str):
        raise invalid(name)
    return value


def opt_str(params: dict[str, Any], name: str, default: str) -> str:
    """An optional string param."""
    return get_str(params, name) if name in params else default


def get_int(params: dict[str, Any], name: str) -> int:
    """A required integer param (a float such as ``1.5`` or a boolean is refused)."""
    if name not in params:
        raise RpcFault(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name)
    return value


def get_number(params: dict[str, Any], name: str) -> float:
    """A required number param, integer or not."""
    if name not in params:
        raise RpcFault(ErrorCode.MISSING_PARAMS)
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name)
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits: JSON allows it, a float cannot
        raise invalid(name) from None


def opt_bool(params: dict[str, Any], name: str, default: bool) -> bool:
    """An optional boolean param."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise invalid(name)
    return value


def get_choice(
    params: dict[str, Any], name: str, choices: tuple[str, ...], default: str | None = None
) -> str:
    """A string param that must be one of ``choices``; required when ``default`` is None."""
    value = get_str(params, name) if default is None else opt_str(params, name, default)
    if value not in choices:
        raise invalid(name, "invalid value")
    return value
