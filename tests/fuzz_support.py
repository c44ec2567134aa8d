"""What the two hop fuzzers share: junk values, a frame that prints short, the bystander account
whose peace they check, and one example run on its own virtual clock."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio
import trio.testing
from hypothesis import strategies as st

from deribit_keeper import events
from deribit_keeper.session import SessionState
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import LogLines
from .gateway_support import Client, upstream

# Signs of a bug: each comes with a traceback in the log.
BUG_EVENTS: Final = {
    events.SESSION_UNEXPECTED_ERROR,
    events.SESSION_OBSERVER_FAILED,
    events.GATEWAY_UNEXPECTED_ERROR,
    events.GATEWAY_OBSERVER_FAILED,
    events.KEEPER_CRASHED,
}

JUNK: Final = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**40), 10**40)
    | st.floats()  # NaN and infinities too: json.dumps writes NaN, Infinity
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame for the fuzzed side to send."""

    payload: str | bytes

    def __repr__(self) -> str:  # a megabyte of frame makes an unreadable falsifying example
        shown = self.payload if len(self.payload) <= 200 else self.payload[:200]
        return f"Frame({shown!r}{'...' if len(self.payload) > 200 else ''})"


class Bystander:
    """The second account ("hedge") and its local client, which no fuzzing may disturb: it
    stays READY on the very same upstream connection, its client connected, the keeper up."""

    def __init__(self, sim: Simulator, keeper: Keeper, client: Client) -> None:
        self.sim, self.keeper, self.client = sim, keeper, client
        self.link = upstream(sim, "hedge")
        self.left_ready: list[str] = []
        keeper.sessions["hedge"].watch(self._watch)

    def _watch(self, _session: object, event: str, _fields: object) -> None:
        if self.keeper.sessions["hedge"].state is not SessionState.READY:
            self.left_ready.append(event)

    def assert_untouched(self) -> None:
        assert not self.left_ready, self.left_ready
        assert self.link.open and upstream(self.sim, "hedge") is self.link
        assert self.client.closed is None
        assert self.keeper.alive()


def log_events_since(log_lines: LogLines, since: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines.text[since:].splitlines() if line.strip()]


def first_bug(found: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in found if e["event"] in BUG_EVENTS), None)


def run_example(
    scene: Callable[[], Awaitable[None]],
    log_lines: LogLines,
    check_log: Callable[[list[dict[str, Any]]], None],
) -> None:
    """One hypothesis example: ``scene`` in a trio.run of its own on an autojump clock, then
    ``check_log`` on the log lines it wrote."""
    since = len(log_lines.text)
    trio.run(scene, clock=trio.testing.MockClock(autojump_threshold=0))
    check_log(log_events_since(log_lines, since))
