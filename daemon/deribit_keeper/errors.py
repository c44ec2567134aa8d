"""The keeper's exception tree, shaped by what the caller does with each error.

``ConfigError`` stops the program with exit code 78. ``SessionLost`` and its children end one
connection: the session logs ``session.lost`` with the ``reason`` slug, backs off and reconnects.
Only ``rpc.py`` translates transport exceptions (trio-websocket, OSError) into ``SessionLost``.
"""

from __future__ import annotations


class KeeperError(Exception):
    """Base of every error the keeper raises on purpose."""


class ConfigError(KeeperError):
    """The configuration cannot be used; the message names the file and the key path."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {problem}")


class SessionLost(KeeperError):
    """One connection to Deribit is over.

    Args:
        reason: a stable slug logged as ``reason`` in ``session.lost`` (e.g. ``closed_by_server``).
        detail: a human sentence naming the cause; never contains a secret or a token.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NotReady(KeeperError):
    """A request could not be relayed: the account's session is not ready (its state says why)."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(f"the session is {state}, not ready")


class FrameTooLarge(KeeperError):
    """A request would be larger than Deribit reads (32 kB); it was not sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(f"a {size}-byte request is over Deribit's frame limit")


class RpcError(SessionLost):
    """Deribit answered a request with a JSON-RPC error object."""

    def __init__(self, method: str, code: int, message: str) -> None:
        self.method = method
        self.code = code
        self.message = message
        super().__init__("rpc_error", f"{method} answered {code} {message}")


class ClosedAfterRateLimit(SessionLost):
    """The link closed after Deribit answered one of its requests 10028: its credits ran out,
    and it ends the connection itself. Retried as a rate limit, not at once."""


class DeadLink(SessionLost):
    """Nothing arrived for longer than the heartbeat interval plus its grace."""

    def __init__(self, silent_s: float) -> None:
        self.silent_s = silent_s
        super().__init__("heartbeat_silence", f"no frame for {silent_s:.1f}s")


class CodNotConfirmed(SessionLost):
    """Deribit did not report Cancel-On-Disconnect as enabled after we enabled it."""

    def __init__(self, scope: str, answer: object) -> None:
        self.scope = scope
        super().__init__("cod_not_confirmed", f"get_cancel_on_disconnect({scope}) gave {answer!r}")


def leaves(error: BaseException) -> list[BaseException]:
    """The plain exceptions inside ``error``, however deeply its ExceptionGroups nest."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]
