"""Facts about Deribit's JSON-RPC v2 API that both the keeper and the simulator rely on.

Everything here comes from ../shared/deribit-protocol.md. Keeping these facts in one module means
the simulator and the keeper cannot drift apart on a number or a formula: the simulator imports
nothing else from the keeper.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import IntEnum
from typing import Final

PROD_URL: Final = "wss://www.deribit.com/ws/api/v2"
TEST_URL: Final = "wss://test.deribit.com/ws/api/v2"
ENVIRONMENT_URLS: Final = {"prod": PROD_URL, "test": TEST_URL}

HEARTBEAT_MIN_S: Final = 10  # Deribit rejects less (public/set_heartbeat)
MAX_FRAME_BYTES: Final = 32 * 1024  # larger frames get -32600 "request entity too large"
MAX_CONNECTIONS_PER_IP: Final = 32  # the 33rd handshake is refused with HTTP 429
API_VERSION: Final = "1.2.26"  # what public/hello and public/test report


class ErrorCode(IntEnum):
    """Deribit error codes the keeper reacts to and the simulator produces."""

    TOO_MANY_REQUESTS = 10028
    BAD_REQUEST = 11050
    INVALID_CREDENTIALS = 13004
    UNAUTHORIZED = 13009
    FORBIDDEN = 13021
    TEMPORARILY_UNAVAILABLE = 13028
    RAW_SUBSCRIPTIONS_NOT_AVAILABLE = 13778
    ORDER_NOT_FOUND = 10004
    NOT_OPEN_ORDER = 11044
    POST_ONLY_REJECT = 11054
    MISSING_PARAMS = -32000
    REQUEST_TOO_LARGE = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    PARSE_ERROR = -32700


ERROR_MESSAGES: Final[dict[int, str]] = {
    ErrorCode.TOO_MANY_REQUESTS: "too_many_requests",
    ErrorCode.BAD_REQUEST: "bad_request",
    ErrorCode.INVALID_CREDENTIALS: "invalid_credentials",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.FORBIDDEN: "forbidden",
    ErrorCode.TEMPORARILY_UNAVAILABLE: "temporarily_unavailable",
    ErrorCode.RAW_SUBSCRIPTIONS_NOT_AVAILABLE: "raw_subscriptions_not_available_for_unauthorized",
    ErrorCode.ORDER_NOT_FOUND: "order_not_found",
    ErrorCode.NOT_OPEN_ORDER: "not_open_order",
    ErrorCode.POST_ONLY_REJECT: "post_only_reject",
    ErrorCode.MISSING_PARAMS: "Missing params",
    ErrorCode.REQUEST_TOO_LARGE: "request entity too large",
    ErrorCode.METHOD_NOT_FOUND: "Method not found",
    ErrorCode.INVALID_PARAMS: "Invalid params",
    ErrorCode.PARSE_ERROR: "Parse error",
}


def sign(secret: str, timestamp_ms: int, nonce: str, data: str = "") -> str:
    """The client_signature of public/auth: lowercase hex HMAC-SHA256 over ts, nonce and data.

    The secret is the HMAC key and never crosses the wire.
    """
    message = f"{timestamp_ms}\n{nonce}\n{data}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
