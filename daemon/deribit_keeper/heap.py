"""Keeping the garbage collector's full passes short while every account is ready.

With 1,000 sessions the keeper holds a quarter of a million objects that live as long as their
links. CPython's cyclic collector walks all of them on every full (generation 2) pass: 150 to
250 ms on this project's 2-core bench machine, during which no test_request is answered. That
pause, a few times a minute, was the steady test_request p99 (``bench/RESULTS.md``).

``gc.freeze()`` moves every object alive now to a permanent generation that the collector skips,
so later passes walk only what was made since: a few thousand objects. The keeper freezes when
every account is ready, when what is alive is what the links need, and unfreezes as soon as one
loses its link: the dead link's objects, some of them in reference cycles, must be collectable
again, or every reconnect would leak them. Frozen objects are still freed by reference counting;
only cycles among them wait for the next unfreeze. Both calls are cheap (two lists spliced).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Final

from . import events
from .session import Session

# A link's end, or a session's (a reload removed its account): their objects go to garbage.
_RELEASING: Final = frozenset({events.SESSION_LOST, events.SESSION_STOPPED})


class HeapFreezer:
    """Freezes the heap once all sessions are ready, and thaws it when one is lost.

    Off (``enabled=False``) in the test suite, whose leak checks count objects with
    ``gc.get_objects()``, which leaves frozen ones out.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.frozen = False

    def session_changed(self, event: str, sessions: Iterable[Session]) -> None:
        """Called after every session event, with every session the keeper runs."""
        if not self.enabled:
            return
        if event in _RELEASING:
            self.thaw()
        elif event == events.SESSION_READY and not self.frozen and all_ready(sessions):
            gc.freeze()
            self.frozen = True

    def thaw(self) -> None:
        """Hand everything back to the collector."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


def all_ready(sessions: Iterable[Session]) -> bool:
    return all(session.ready for session in sessions)
