"""The Keeper: one nursery holding a Session per account, and the process's signals.

Accounts are isolated: a Session absorbs its own failures (it logs, backs off and reconnects), so
nothing one account meets can cancel another. Shutdown is the one thing the Keeper does to all of
them at once: every session ends per its ``on_shutdown``, under one deadline, so the process exits
within ``SHUTDOWN_DEADLINE_S`` even if Deribit never answers.
"""

from __future__ import annotations

import random
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Final

import trio

from . import __version__, events
from .config import KeeperConfig
from .logs import get_logger
from .session import Session, SessionState

# systemd's and Kubernetes' patience is usually longer; 5 s is the promise made in the README.
# Half a second is kept back for closing sockets and the last log lines.
SHUTDOWN_DEADLINE_S: Final = 4.5
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class Keeper:
    """Runs every configured account's Session until ``stop()`` or SIGTERM/SIGINT."""

    def __init__(
        self,
        config: KeeperConfig,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        rng = rng if rng is not None else random.Random()
        self.sessions: Mapping[str, Session] = {
            account.name: Session(
                account,
                rng=random.Random(rng.random()),
                wall_clock=wall_clock,
                ssl_context=ssl_context,
            )
            for account in config.accounts
        }
        self._log = get_logger()
        self._sessions_scope: trio.CancelScope | None = None
        self._stopping = False

    def __repr__(self) -> str:
        ready = sum(s.state is SessionState.READY for s in self.sessions.values())
        return f"<Keeper {ready}/{len(self.sessions)} ready>"

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until every session has stopped. ``task_status.started()`` once all are launched.

        With ``handle_signals`` the first SIGTERM or SIGINT starts a graceful stop and a second
        one ends the sessions at once.
        """
        async with trio.open_nursery() as outer:
            if handle_signals:
                await outer.start(self._stop_on_signals)
            self._log.info(events.KEEPER_STARTED, version=__version__, accounts=len(self.sessions))
            async with trio.open_nursery() as sessions:
                self._sessions_scope = sessions.cancel_scope
                for name, session in self.sessions.items():
                    sessions.start_soon(session.run, name=f"session:{name}")
                task_status.started()
            outer.cancel_scope.cancel()  # every session is done: stop listening for signals
        self._log.info(events.KEEPER_STOPPED)

    def stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop; called again, end every session at once.

        Safe before ``run()``: sessions told to stop before they start end at once.
        """
        if self._stopping:
            if self._sessions_scope is not None:
                self._sessions_scope.cancel()
            return
        self._stopping = True
        self._log.info(events.KEEPER_STOPPING, reason=reason, deadline_s=SHUTDOWN_DEADLINE_S)
        for session in self.sessions.values():
            session.stop()
        if self._sessions_scope is not None:
            self._sessions_scope.deadline = trio.current_time() + SHUTDOWN_DEADLINE_S

    async def _stop_on_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as received:
            task_status.started()
            async for signum in received:
                self.stop(reason=signal.Signals(signum).name)
