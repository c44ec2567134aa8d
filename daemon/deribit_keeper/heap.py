"""Keeping the garbage collector out of the way: short full passes, none in a set-up storm.

With 1,000 sessions the keeper holds a quarter of a million objects that live as long as their
links. CPython's cyclic collector walks all of them on every full (generation 2) pass: 150 to
250 ms on this project's 2-core bench machine, during which no test_request is answered. Such a
pause a few times a minute made the steady test_request p99 (``bench/RESULTS.md``).

``gc.freeze()`` moves every object alive now to a permanent generation that the collector skips,
so later passes walk only what was made since. The keeper freezes whenever a session gets
ready, when what it made for its link is what the link will keep, and unfreezes as soon as one
loses its link or stops: the dead link's objects, some of them in reference cycles, must be
collectable again, or every reconnect would leak them. Frozen objects are still freed by
reference counting; only cycles among them wait for the next unfreeze. Both calls are cheap
(lists spliced, nothing walked).

From a loss (or a session's start) on, the keeper owes the collector a full pass, and the
automatic passes wait for it (``gc.disable``). While a thousand links set up at once, the
objects they make for good pile up in the young generations, and the collector walked them
over and over: a second of collections in the bench's start of 1,000 accounts, half the time
until all were ready. A reconnect storm is the same, and a pass in the middle of it stopped
every set-up while the pacer's slots fell due, which then all started at once. The owed pass is
paid, and the automatic ones resume, once every account is ready (no set-up is delayed by it),
and at the latest ``OWED_AT_MOST_S`` after the loss, by a task of the Keeper's (``run``): an
account that never gets ready (a wrong key), or a reload that removed one while the others stay
ready, brings no ready to pay at, and the collector must not stay off while the gateways make
garbage. Until then only what the set-ups make in reference cycles waits, which is little: the
bench's RSS at ready moved by a megabyte.
"""

from __future__ import annotations

import gc
from typing import Final

import trio

from . import events

# A link's end, or a session's (a reload removed its account): their objects go to garbage.
_RELEASING: Final = frozenset({events.SESSION_LOST, events.SESSION_STOPPED})
# The longest the owed full pass waits for every account to be ready, in seconds.
OWED_AT_MOST_S: Final = 5.0


class HeapFreezer:
    """Freezes the heap when a session gets ready, thaws it when one is lost, and holds the
    collector off from a loss until every account is ready again.

    Off (``enabled=False``) in the test suite, whose leak checks count objects with
    ``gc.get_objects()``, which leaves frozen ones out.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.frozen = False
        self._owed_since: float | None = None  # Trio time of the first loss since a full pass
        self._owing = trio.Event()  # set while a pass is owed; a fresh one once it is paid

    def session_changed(self, event: str, *, all_ready: bool) -> None:
        """Called after every session event; ``all_ready``: every account is ready now."""
        if not self.enabled:
            return
        if event in _RELEASING:
            self.thaw()
        elif event == events.SESSION_READY:
            if all_ready and self._owed_since is not None:
                self._collect()
            else:
                self.freeze()

    async def run(self) -> None:
        """Pay each owed pass ``OWED_AT_MOST_S`` after the loss that owed it, unless a ready
        paid it first; runs until cancelled, and then lets the collector run again (the Keeper
        is done, and its last sessions' stops owed a pass that nobody is left to pay)."""
        try:
            while True:
                await self._owing.wait()
                owed = self._owed_since
                if owed is None:
                    continue  # paid meanwhile: wait for the next loss
                await trio.sleep_until(owed + OWED_AT_MOST_S)
                if self._owed_since == owed:  # neither paid nor paid and owed anew
                    self._collect()
        finally:
            self._release()

    def freeze(self) -> None:
        """Keep what is alive now out of the collector's passes."""
        gc.freeze()
        self.frozen = True

    def thaw(self) -> None:
        """Hand everything back to the collector, owe it a full pass, and hold its automatic
        passes until then."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        if self._owed_since is None:
            self._owed_since = trio.current_time()
            self._owing.set()
            gc.disable()

    def _release(self) -> None:
        """Owe nothing, and let the automatic passes run again."""
        if self._owed_since is not None:
            self._owed_since = None
            self._owing = trio.Event()
            gc.enable()

    def _collect(self) -> None:
        """The owed full pass, over everything (what was frozen meanwhile may hold the garbage);
        then freeze what survived and let the automatic passes run again."""
        gc.unfreeze()
        gc.collect()
        self.freeze()
        self._release()
