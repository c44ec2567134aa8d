"""Unit tests of ``deribit_keeper.rest``: Deribit's HTTP API as a server reads it, with no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deribit_keeper.jsonrpc import NO_ID, BadFrame, RpcFault
from deribit_keeper.protocol import MAX_FRAME_BYTES, ErrorCode
from deribit_keeper.rest import (
    Bearer,
    Signed,
    answer_status,
    query_params,
    read_authorization,
    read_request,
    request_uri,
    websocket_only,
    websocket_only_fault,
    without_id,
)


def bad_frame(http_method: str, path: str, query: str = "", body: bytes = b"") -> BadFrame:
    with pytest.raises(BadFrame) as caught:
        read_request(http_method, path, query, body)
    return caught.value


def test_a_get_names_its_method_by_path_and_has_no_id() -> None:
    """GET /api/v2/{method}?params is the method with the query's params and no id."""
    request = read_request("GET", "/api/v2/private/buy", "instrument_name=BTC-PERPETUAL", b"")
    assert (request.method, request.params, request.id) == (
        "private/buy",
        {"instrument_name": "BTC-PERPETUAL"},
        NO_ID,
    )


def test_query_params_type_numbers_and_booleans_by_name_only() -> None:
    """Numbers and booleans convert by param name; every other param stays a string."""
    params = query_params(
        "amount=10&price=49999.5&post_only=true&reduce_only=false"
        "&order_id=12345&label=007&nonce=42&timestamp=1700000000000"
    )
    assert params == {
        "amount": 10,
        "price": 49999.5,
        "post_only": True,
        "reduce_only": False,
        "order_id": "12345",
        "label": "007",
        "nonce": "42",
        "timestamp": 1700000000000,
    }


@pytest.mark.parametrize(
    ("query", "value"),
    [
        ("amount=ten", "ten"),
        ("amount=NaN", "NaN"),
        ("amount=1e999", "1e999"),
        ("amount=true", "true"),
        ("amount=", ""),
        ("post_only=True", "True"),
        ("post_only=1", "1"),
    ],
)
def test_a_value_that_does_not_convert_stays_a_string(query: str, value: str) -> None:
    """What a param's type cannot hold is left as the string sent, for the method's -32602."""
    assert next(iter(query_params(query).values())) == value


def test_query_params_decode_percent_escapes_and_let_the_last_repeat_win() -> None:
    """Escapes are decoded; of repeated keys the last wins."""
    assert query_params("label=a%20b%2Bc&label=last&currency=BTC") == {
        "label": "last",
        "currency": "BTC",
    }
    assert query_params("label=a%20b%2Bc") == {"label": "a b+c"}


def test_a_post_body_is_a_json_rpc_request_whose_id_is_echoed() -> None:
    """POST /api/v2 takes method, params and id from the body."""
    body = json.dumps({"jsonrpc": "2.0", "id": "x-1", "method": "public/test", "params": {}})
    request = read_request("POST", "/api/v2", "", body.encode())
    assert (request.method, request.id, request.params) == ("public/test", "x-1", {})


def test_a_post_body_without_method_takes_the_paths() -> None:
    """POST /api/v2/{method} with a body that names no method calls the path's."""
    body = json.dumps({"id": 3, "params": {"currency": "BTC", "label": "é"}}, ensure_ascii=False)
    request = read_request("POST", "/api/v2/private/cancel_all", "", body.encode())
    assert request.method == "private/cancel_all"
    assert request.params == {"currency": "BTC", "label": "é"}
    assert request.id == 3


def test_the_bodys_method_wins_over_the_paths() -> None:
    """A body naming its own method is that method, whatever the path says."""
    body = b'{"method": "public/test"}'
    assert read_request("POST", "/api/v2/private/buy", "", body).method == "public/test"


def test_a_post_without_a_body_reads_the_query_like_a_get() -> None:
    """An empty (or blank) POST body means the params are in the query string."""
    request = read_request("POST", "/api/v2/public/test", "expected_result=exception", b"  \r\n")
    assert (request.method, request.params) == ("public/test", {"expected_result": "exception"})


@pytest.mark.parametrize("path", ["/api/v2", "/api/v2/", "/elsewhere/public/test"])
def test_a_get_whose_path_names_no_method_is_method_not_found(path: str) -> None:
    """No method in the path (and no body to name one) is -32601."""
    assert bad_frame("GET", path).fault.code == ErrorCode.METHOD_NOT_FOUND


@pytest.mark.parametrize("http_method", ["POST", "GET"])
def test_a_body_over_32_kB_is_request_too_large_without_id(http_method: str) -> None:
    """Over MAX_FRAME_BYTES is -32600, blank or not, GET or POST, and the answer has no id."""
    for body in (b" " * (MAX_FRAME_BYTES + 1), b'{"id": 1, "x": "' + b"a" * MAX_FRAME_BYTES):
        bad = bad_frame(http_method, "/api/v2/public/test", body=body)
        assert (bad.fault.code, bad.request_id) == (ErrorCode.REQUEST_TOO_LARGE, NO_ID)


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"method": "public/test", "x": NaN}', b"\xff\xfe{}", b"[" * 10_000]
)
def test_a_body_that_is_not_json_is_a_parse_error(body: bytes) -> None:
    """Not JSON (or not UTF-8, or NaN, which JSON lacks) is -32700 without id."""
    bad = bad_frame("POST", "/api/v2/public/test", body=body[:MAX_FRAME_BYTES])
    assert (bad.fault.code, bad.request_id) == (ErrorCode.PARSE_ERROR, NO_ID)


def test_a_body_with_params_of_the_wrong_shape_is_invalid_params_with_its_id() -> None:
    """``params`` that is not an object is -32602 and keeps the request's id."""
    bad = bad_frame("POST", "/api/v2", body=b'{"id": 9, "method": "public/test", "params": [1]}')
    assert (bad.fault.code, bad.request_id) == (ErrorCode.INVALID_PARAMS, 9)


def test_a_body_that_is_no_request_is_missing_params() -> None:
    """JSON that is not a request object (and no path method) is -32000, as on a WebSocket."""
    assert bad_frame("POST", "/api/v2", body=b"[1, 2]").fault.code == ErrorCode.MISSING_PARAMS
    assert bad_frame("POST", "/api/v2", body=b'{"id": 1}').fault.code == ErrorCode.MISSING_PARAMS


def test_a_bearer_header_holds_its_token_and_hides_it() -> None:
    """``Bearer <token>`` (any case) is the token; its repr does not show it."""
    credential = read_authorization("bearer   1700.abc.def ")
    assert credential == Bearer("1700.abc.def")
    assert "1700.abc.def" not in repr(credential)


def test_a_signature_header_is_read_field_by_field() -> None:
    """``deri-hmac-sha256 id=,ts=,sig=,nonce=`` in any order, spaces allowed; repr hides sig."""
    header = "deri-hmac-sha256 nonce=abc, ts=1700000000000,sig=deadbeef , id=main-id"
    credential = read_authorization(header)
    assert credential == Signed("main-id", 1700000000000, "abc", "deadbeef")
    assert "deadbeef" not in repr(credential)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_no_authorization_header_is_no_credential(header: str | None) -> None:
    """Absent or blank: None, for the method to refuse if it is private."""
    assert read_authorization(header) is None


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer   ",
        "deri-hmac-sha256",
        "deri-hmac-sha256 id=main-id,ts=1700000000000,sig=00",
        "deri-hmac-sha256 id=,ts=1700000000000,sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=soon,sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=1_700_000_000_000,sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=+1700000000000,sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=-1,sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=1" + "0" * 40 + ",sig=00,nonce=n",
        "deri-hmac-sha256 id=main-id,ts=1700000000000,sig=00,nonce",
    ],
)
def test_an_unreadable_authorization_header_is_unauthorized(header: str) -> None:
    """Another scheme, a field missing or empty, a timestamp that is not plain digits: 13009."""
    with pytest.raises(RpcFault) as caught:
        read_authorization(header)
    assert caught.value.code == ErrorCode.UNAUTHORIZED


def test_request_uri_is_the_path_with_its_query_as_sent() -> None:
    """The signed URI is the raw path plus ``?query``, or the bare path without a query."""
    assert request_uri(b"/api/v2/private/buy", b"amount=10&price=1") == (
        "/api/v2/private/buy?amount=10&price=1"
    )
    assert request_uri(b"/api/v2/private/cancel_all", b"") == "/api/v2/private/cancel_all"


@pytest.mark.parametrize(
    ("method", "params", "refused"),
    [
        ("public/set_heartbeat", {"interval": 10}, True),
        ("public/disable_heartbeat", {}, True),
        ("private/logout", {}, True),
        ("public/subscribe", {"channels": []}, True),
        ("private/unsubscribe_all", {}, True),
        ("private/enable_cancel_on_disconnect", {}, True),
        ("private/disable_cancel_on_disconnect", {"scope": "connection"}, True),
        ("private/get_cancel_on_disconnect", {"scope": ["account"]}, True),
        ("private/enable_cancel_on_disconnect", {"scope": "account"}, False),
        ("private/get_cancel_on_disconnect", {"scope": "account"}, False),
        ("private/buy", {}, False),
        ("public/test", {}, False),
    ],
)
def test_websocket_only_methods_are_those_about_a_connection(
    method: str, params: dict[str, Any], refused: bool
) -> None:
    """Heartbeats, subscriptions, logout and connection-scoped COD need a WebSocket."""
    assert websocket_only(method, params) is refused


def test_websocket_only_methods_are_refused_as_method_not_found() -> None:
    """The refusal is -32601, as for a method HTTP does not have."""
    assert websocket_only_fault().code == ErrorCode.METHOD_NOT_FOUND


def test_answer_status_is_400_for_errors_only() -> None:
    """Deribit answers errors with 400 and everything else with 200."""
    assert answer_status({"jsonrpc": "2.0", "result": None}) == 200
    assert answer_status({"jsonrpc": "2.0", "error": {"code": 13009}}) == 400


def test_without_id_drops_the_upstream_id_or_puts_the_clients_own() -> None:
    """A relayed answer loses its upstream id, or carries the client's id right after jsonrpc."""
    answer = {"jsonrpc": "2.0", "id": 77, "result": 1, "usIn": 1}
    assert without_id(answer, NO_ID) == {"jsonrpc": "2.0", "result": 1, "usIn": 1}
    shaped = without_id(answer, "mine")
    assert shaped == {"jsonrpc": "2.0", "id": "mine", "result": 1, "usIn": 1}
    assert list(shaped)[:2] == ["jsonrpc", "id"]
