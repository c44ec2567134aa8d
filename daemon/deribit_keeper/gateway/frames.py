"""What the gateway adds to Deribit's framing (``jsonrpc.py``): relayed answers, channel lists.

A relayed answer is Deribit's own, unchanged but for the id: the gateway's upstream id is
swapped back for the client's, with the JSON type the client used.
"""

from __future__ import annotations

from typing import Any

from ..jsonrpc import NO_ID, RpcFault, dumps, invalid
from ..protocol import ErrorCode


def relayed_frame(request_id: Any, answer: dict[str, Any]) -> str:
    """Deribit's answer under the client's own id (none if the client's request had none)."""
    if request_id is NO_ID:
        answer.pop("id", None)
    else:
        answer["id"] = request_id
    return dumps(answer)


def get_channels(params: dict[str, Any]) -> list[str]:
    """``channels``: a list of strings, for the subscribe methods."""
    if "channels" not in params:
        raise RpcFault(ErrorCode.MISSING_PARAMS)
    channels = params["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise invalid("channels")
    return channels
