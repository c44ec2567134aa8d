"""Keeping the garbage collector's full passes short.

With 1,000 sessions the keeper holds a quarter of a million objects that live as long as their
links. CPython's cyclic collector walks all of them on every full (generation 2) pass: 150 to
250 ms on this project's 2-core bench machine, during which no test_request is answered. Such a
pause a few times a minute made the steady test_request p99 (``bench/RESULTS.md``), and five of
them took half a second of the 1,000 set-ups.

``gc.freeze()`` moves every object alive now to a permanent generation that the collector skips,
so later passes walk only what was made since. The keeper freezes whenever a session gets
ready, when what it made for its link is what the link will keep, and unfreezes as soon as one
loses its link or stops: the dead link's objects, some of them in reference cycles, must be
collectable again, or every reconnect would leak them. Frozen objects are still freed by
reference counting; only cycles among them wait for the next unfreeze. Both calls are cheap
(lists spliced, nothing walked).

A reconnect is often quicker than the collector's own next full pass, so the dead link's cycles
would be frozen again with the new link: the keeper owes a full pass from the first loss on,
and pays it at a ready. Not at the first one: after a mass disconnect that pass (a quarter of a
second at 1,000 sessions) stopped every set-up in the middle of the storm, and the pacer's
slots that fell due meanwhile all started at once after it (the bench's reset put 77% of the
auths in one second). It is paid once every account is ready again, when a pause delays no
set-up, or at the first ready ``OWED_AT_MOST_S`` after the loss, so that an account that never
gets ready (a wrong key) cannot make the garbage wait for ever. Freezing meanwhile is harmless:
the pass unfreezes first.
"""

from __future__ import annotations

import gc
from typing import Final

import trio

from . import events

# A link's end, or a session's (a reload removed its account): their objects go to garbage.
_RELEASING: Final = frozenset({events.SESSION_LOST, events.SESSION_STOPPED})
# The longest a full pass waits for every account to be ready, after a loss, in seconds.
OWED_AT_MOST_S: Final = 5.0


class HeapFreezer:
    """Freezes the heap when a session gets ready, and thaws it when one is lost.

    Off (``enabled=False``) in the test suite, whose leak checks count objects with
    ``gc.get_objects()``, which leaves frozen ones out.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.frozen = False
        self._owed_since: float | None = None  # Trio time of the first loss since a full pass

    def session_changed(self, event: str, *, all_ready: bool) -> None:
        """Called after every session event; ``all_ready``: every account is ready now."""
        if not self.enabled:
            return
        if event in _RELEASING:
            self.thaw()
        elif event == events.SESSION_READY:
            self.freeze(all_ready=all_ready)

    def freeze(self, *, all_ready: bool) -> None:
        """Keep what is alive now out of the collector's passes, after the full pass a loss
        left owing if every account is ready or it has waited long enough."""
        owed = self._owed_since
        if owed is not None and (all_ready or trio.current_time() - owed >= OWED_AT_MOST_S):
            gc.unfreeze()  # what an earlier ready froze meanwhile may hold the garbage
            gc.collect()
            self._owed_since = None
        gc.freeze()
        self.frozen = True

    def thaw(self) -> None:
        """Hand everything back to the collector, and owe it a full pass."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        if self._owed_since is None:
            self._owed_since = trio.current_time()
