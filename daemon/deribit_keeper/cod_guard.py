"""What the keeper asks Deribit about Cancel-On-Disconnect, and how often it asks again.

A session turns COD on and has it confirmed before it is ready (``enable_cod``). That is not the
end of it: with ``cancel_on_disconnect: account`` the setting lives on Deribit's side, where the
web UI, another tool or a forwarded ``private/disable_cancel_on_disconnect`` can turn it off; and
the relaying connection's own COD is the promise the keeper makes, whatever scope is configured.
So a ready session's ``CodGuard`` re-reads every scope it guards (``guarded_scopes``) every
``cod_check_interval`` seconds, after every token refresh, and (the account setting) before a
reconnect enables it again; ``find_drift`` does one such reading.

The guard decides *when* to read and what a refusal means; what a drift does to the session
(leave READY, enable, confirm, READY again) is a state change, so the guard hands it to the
``repair`` the session gives it, and tells everything else through the session's ``emit``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import events
from .errors import CodNotConfirmed, RpcError, SessionLost
from .protocol import ErrorCode
from .rpc import RpcConnection

GET_COD: Final = "private/get_cancel_on_disconnect"
ENABLE_COD: Final = "private/enable_cancel_on_disconnect"
ACCOUNT: Final = "account"
CONNECTION: Final = "connection"


@dataclass(frozen=True, slots=True)
class Drift:
    """COD found not enabled for ``scope``; ``found`` is Deribit's answer as it came."""

    scope: str
    found: Any


Emit = Callable[..., None]  # emit(level, event, **fields): the session's one way to log and tell
Repair = Callable[[RpcConnection, Drift], Awaitable[None]]


def guarded_scopes(configured: str) -> tuple[str, ...]:
    """The scopes a session keeps confirmed: the account setting when that is what the operator
    chose, and always the connection the session relays over (the account setting does not
    reach a connection already open, see the protocol notes)."""
    return (ACCOUNT, CONNECTION) if configured == ACCOUNT else (CONNECTION,)


def _enabled(answer: Any) -> bool:
    """Only an explicit ``enabled: true`` counts: a malformed answer confirms nothing."""
    return isinstance(answer, dict) and answer.get("enabled") is True


async def find_drift(rpc: RpcConnection, scopes: Sequence[str]) -> Drift | None:
    """Read ``private/get_cancel_on_disconnect`` for each scope in turn; the first one found
    not enabled, or None if all are.

    Raises:
        RpcError: Deribit refused a reading (the caller decides whether that ends the link).
        SessionLost: no answer within the request timeout, or the link ended.
    """
    for scope in scopes:
        answer = await rpc.call(GET_COD, {"scope": scope})
        if not _enabled(answer):
            return Drift(scope, answer)
    return None


async def enable_cod(rpc: RpcConnection, scope: str) -> None:
    """Turn COD on and make Deribit confirm it, for the connection this session stands on.

    With scope ``account`` the account setting protects connections opened *later*; the one we
    are on began with the old setting, so it is enabled and confirmed with scope ``connection`` too.

    Raises:
        CodNotConfirmed: Deribit did not report ``enabled: true`` for a scope.
        RpcError, SessionLost: as for any request.
    """
    for each in guarded_scopes(scope):
        await rpc.call(ENABLE_COD, {"scope": each})
        answer = await rpc.call(GET_COD, {"scope": each})
        if not _enabled(answer):
            raise CodNotConfirmed(each, answer)


class CodGuard:
    """When one session reads COD again, and what it does with the answer.

    Args:
        configured: the account's ``cancel_on_disconnect`` scope.
        interval: ``cod_check_interval``, seconds between two readings of a ready link.
        emit: the session's ``_emit``; ``session.cod_drift`` and ``session.cod_check_failed``
            go through it, so logs, metrics and status hear of them as of any event.
        repair: the session's in-place repair, called with the drift; its errors end the
            link.

    The session calls ``check`` and ``confirm`` from one task, one after the other, so that a
    token refresh's reading never runs beside a check: it could see COD still off during a
    repair, call it a second drift, and start a second repair.
    """

    def __init__(self, configured: str, interval: float, *, emit: Emit, repair: Repair) -> None:
        self.scopes = guarded_scopes(configured)
        self._configured = configured
        self._interval = interval
        self._emit = emit
        self._repair = repair

    @property
    def interval(self) -> float:
        """Seconds from the end of one check to the next (the first one after READY)."""
        return self._interval

    async def check(self, rpc: RpcConnection) -> None:
        """Read each guarded scope and repair a drift: one periodic check.

        A refused reading (13028 or any other error answer but a rate limit) is logged as
        ``session.cod_check_failed`` and tried again at the next interval: dropping the link
        for it would fire COD and cancel every protected order over a transient refusal. A
        rate limit (10028) ends the link, as Deribit ends the session then anyway. A reading
        left unanswered past the request timeout is also only a warning: one slow answer on a
        link whose silence watchdog says it is alive must not end it (its COD would cancel the
        whole book); a dead link is the watchdog's to find.
        """
        drift = await self._read_or_warn(rpc, self.scopes, during="check")
        if drift is not None:
            await self._report_and_repair(rpc, drift, during="check")

    async def confirm(self, rpc: RpcConnection, *, during: str) -> None:
        """Read the connection's COD once more (after a token refresh) and repair a drift.

        Unlike a periodic check, a refused reading here ends the link, as it did before there
        was a guard: the refresh asks for a confirmation, not for news.

        Raises:
            RpcError, SessionLost: the reading failed, or the repair did.
        """
        drift = await find_drift(rpc, (CONNECTION,))
        if drift is not None:
            await self._report_and_repair(rpc, drift, during=during)

    async def before_reenabling(self, rpc: RpcConnection) -> None:
        """At a reconnect, read the account setting before it is enabled again, and report it
        if it was off: how a drift that happened while the link was down is noticed.

        Only with scope ``account``; the caller calls it only when its session has confirmed
        COD before, as on the very first connect off is just where a fresh account starts. COD
        is enabled next whatever the reading says, so a refused reading is only a warning.
        """
        if self._configured != ACCOUNT:
            return
        drift = await self._read_or_warn(rpc, (ACCOUNT,), during="reconnect")
        if drift is not None:
            self._report(drift, during="reconnect")

    async def _report_and_repair(self, rpc: RpcConnection, drift: Drift, *, during: str) -> None:
        self._report(drift, during=during)
        await self._repair(rpc, drift)

    def _report(self, drift: Drift, *, during: str) -> None:
        self._emit(
            logging.ERROR,
            events.SESSION_COD_DRIFT,
            scope=drift.scope,
            found=drift.found,
            during=during,
        )

    async def _read_or_warn(
        self, rpc: RpcConnection, scopes: Sequence[str], *, during: str
    ) -> Drift | None:
        """``find_drift``, with an error answer but a rate limit, or no answer in time, logged
        and taken as no news.

        Raises:
            RpcError: 10028, a rate limit.
            SessionLost: the link ended.
        """
        try:
            return await find_drift(rpc, scopes)
        except RpcError as refused:
            if refused.code == ErrorCode.TOO_MANY_REQUESTS:
                raise
            code: int | None = refused.code
            detail = refused.detail
        except SessionLost as lost:
            if lost.reason != "request_timeout":
                raise  # the link ended: nothing to retry on it
            code, detail = None, lost.detail
        self._emit(
            logging.WARNING,
            events.SESSION_COD_CHECK_FAILED,
            during=during,
            code=code,
            detail=detail,
        )
        return None
