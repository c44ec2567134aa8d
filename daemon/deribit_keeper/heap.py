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
(lists spliced, nothing walked); but the next freeze after an unfreeze first runs a full pass,
since a reconnect is often quicker than the collector's own next one, and the dead link's
cycles would be frozen again. That pass comes as a session gets ready, when a pause of a
fraction of a second delays nothing that has a deadline shorter than a heartbeat interval.
"""

from __future__ import annotations

import gc
from typing import Final

from . import events

# A link's end, or a session's (a reload removed its account): their objects go to garbage.
_RELEASING: Final = frozenset({events.SESSION_LOST, events.SESSION_STOPPED})


class HeapFreezer:
    """Freezes the heap when a session gets ready, and thaws it when one is lost.

    Off (``enabled=False``) in the test suite, whose leak checks count objects with
    ``gc.get_objects()``, which leaves frozen ones out.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.frozen = False
        self._thawed = False  # since the last full pass: what was frozen may be garbage now

    def session_changed(self, event: str) -> None:
        """Called after every session event."""
        if not self.enabled:
            return
        if event in _RELEASING:
            self.thaw()
        elif event == events.SESSION_READY:
            self.freeze()

    def freeze(self) -> None:
        """Keep what is alive now out of the collector's passes."""
        if self._thawed:
            gc.collect()
            self._thawed = False
        gc.freeze()
        self.frozen = True

    def thaw(self) -> None:
        """Hand everything back to the collector."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
            self._thawed = True
