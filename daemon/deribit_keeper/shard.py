"""Which accounts one keeper of many holds: ``--shard INDEX/COUNT`` by rendezvous hashing.

Why rendezvous (highest-random-weight) hashing of the account *name*:

* **A partition with no coordination.** Every keeper computes the same answer from the config
  alone, so Kubernetes (a StatefulSet's pod ordinal) is the only coordinator we need.
* **Minimal movement.** An account goes to the shard whose weight ``hash(shard, name)`` is
  highest. Adding shard COUNT moves exactly the accounts whose new weight beats their old maximum
  (about 1/(COUNT+1) of them), all onto the new shard; removing the last shard moves only its own
  accounts. ``name % COUNT`` would move almost every account, and every move is a reconnect.
* **Stable everywhere.** The weight is BLAKE2b, never ``hash()``, which is salted per process
  (PYTHONHASHSEED), so two machines, two Python versions and two restarts agree. Tests pin golden
  values so that a change of hash, which would reshuffle a running fleet, cannot go unnoticed.

Cost is COUNT hashes per account, at start and on reload only; nothing here runs per message.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .config import AccountConfig

SHARD_VAR: Final = "DERIBIT_KEEPER_SHARD"  # set per pod, e.g. "$(POD_INDEX)/3" in a StatefulSet
SHARD_COUNT_MAX: Final = 1024  # COUNT hashes per account; no fleet needs more keepers than this
_FORM: Final = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")
_EXPECTED: Final = "expected INDEX/COUNT, e.g. 0/3, with 0 <= INDEX < COUNT"


@dataclass(frozen=True, slots=True)
class Shard:
    """This keeper's part of the accounts: number ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count <= SHARD_COUNT_MAX:
            raise ValueError(f"shard {self.index}/{self.count}: {_EXPECTED}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"INDEX/COUNT"`` (spaces allowed) as a ``Shard``.

    Raises:
        ValueError: one line naming the text, what is wrong and the form expected.
    """
    match = _FORM.fullmatch(text)
    if match is None:
        raise ValueError(f"shard {text!r}: {_EXPECTED}")
    # Cap the digits before int(): a 5000-digit string is out of range, not a different error.
    index, count = (int(d) if len(d) <= 9 else 10**9 for d in match.groups())
    if count < 1:
        raise ValueError(f"shard {text!r}: COUNT must be at least 1")
    if count > SHARD_COUNT_MAX:
        raise ValueError(f"shard {text!r}: COUNT must be at most {SHARD_COUNT_MAX}")
    if index >= count:
        raise ValueError(f"shard {text!r}: INDEX must be below COUNT (0..{count - 1})")
    return Shard(index, count)


def configured_shard(given: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """The ``--shard`` value if given, else ``$DERIBIT_KEEPER_SHARD`` if set and non-empty.

    None means this keeper holds every account. An error from the variable names the variable,
    since the operator may not know where the pod got it from.

    Raises:
        ValueError: the value is not a valid ``INDEX/COUNT``.
    """
    if given is not None:
        return parse_shard(given)
    value = (os.environ if environ is None else environ).get(SHARD_VAR, "")
    if not value.strip():
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise ValueError(f"{SHARD_VAR}: {exc}") from None


def _weight(index: int, name: str) -> int:
    # The NUL separator keeps (1, "2x") and (12, "x") apart; 8 bytes make ties practically absent.
    digest = hashlib.blake2b(f"{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_of(name: str, count: int) -> int:
    """The shard in ``range(count)`` that holds account ``name``: the one of highest weight.

    A tie (one chance in 2**64 per pair) goes to the lower index, so the answer is still unique.
    """
    if not 1 <= count <= SHARD_COUNT_MAX:
        raise ValueError(f"shard count must be 1..{SHARD_COUNT_MAX}, got {count}")
    return max(range(count), key=lambda index: _weight(index, name))


def select(accounts: Sequence[AccountConfig], shard: Shard | None) -> tuple[AccountConfig, ...]:
    """The accounts ``shard`` holds, in config order; all of them when ``shard`` is None.

    May be empty (more shards than accounts); the caller decides whether an idle keeper is fine.
    """
    if shard is None:
        return tuple(accounts)
    return tuple(a for a in accounts if shard_of(a.name, shard.count) == shard.index)
