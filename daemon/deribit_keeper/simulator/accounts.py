"""The simulator's accounts and the YAML file that lists them.

The simulator knows an account only by the API key a client authenticates with: a ``client_id``
and its ``client_secret``. The ``name`` is for people (logs, the CLI's listing). The loader is
strict so that a typo in a test fixture or a demo file fails at start with the file and the entry
named, instead of surfacing later as a puzzling ``invalid_credentials``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

_KEYS: Final = ("name", "client_id", "client_secret")


@dataclass(frozen=True, slots=True)
class SimAccount:
    """One API key the simulator accepts.

    Attributes:
        name: a label for people; never sent on the wire.
        client_id: what ``public/auth`` names the key by.
        client_secret: the key's secret; ``repr`` hides it so that it cannot reach a log.
    """

    name: str
    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"SimAccount(name={self.name!r}, client_id={self.client_id!r}, client_secret='***')"


def check_unique(accounts: Iterable[SimAccount]) -> dict[str, SimAccount]:
    """Index accounts by client_id, refusing duplicates.

    Two accounts with one client_id would make authentication ambiguous, so this is an error
    rather than "last one wins".

    Raises:
        ValueError: a client_id appears twice.
    """
    by_id: dict[str, SimAccount] = {}
    for account in accounts:
        if account.client_id in by_id:
            raise ValueError(f"duplicate client_id {account.client_id!r}")
        by_id[account.client_id] = account
    return by_id


def load_accounts(path: str | Path) -> list[SimAccount]:
    """Read a YAML file holding a list of ``{name, client_id, client_secret}`` mappings.

    Every problem is reported as one line naming the file and the entry index (counted from 0);
    a secret's value never appears in a message.

    Raises:
        ValueError: the file cannot be read, is not YAML, is not a non-empty list, or an entry is
            not a mapping, lacks a key, has an unknown key, has a value that is not a non-empty
            string, or repeats another entry's client_id or name.
    """
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the problem and its line: PyYAML's full message quotes the offending line, which
        # may hold a secret.
        problem = getattr(exc, "problem", None) or "invalid YAML"
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{where}: not valid YAML{line}: {problem}") from exc
    if not isinstance(document, list):
        raise ValueError(f"{where}: expected a list of accounts, got {type(document).__name__}")
    if not document:
        raise ValueError(f"{where}: the list of accounts is empty")
    accounts = [_account(where, index, entry) for index, entry in enumerate(document)]
    first_seen: dict[tuple[str, str], int] = {}
    for index, account in enumerate(accounts):
        for key in ("client_id", "name"):
            value: str = getattr(account, key)
            earlier = first_seen.setdefault((key, value), index)
            if earlier != index:
                raise ValueError(
                    f"{where}: entry {index}: duplicate {key} {value!r} (also entry {earlier})"
                )
    return accounts


def _account(where: str, index: int, entry: object) -> SimAccount:
    """Validate one list entry and build its SimAccount."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry {index}: expected a mapping, got {type(entry).__name__}")
    unknown = sorted(str(key) for key in entry if key not in _KEYS)
    if unknown:
        raise ValueError(f"{where}: entry {index}: unknown key {unknown[0]!r}")
    values: dict[str, str] = {}
    for key in _KEYS:
        if key not in entry:
            raise ValueError(f"{where}: entry {index}: missing key {key!r}")
        value = entry[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: entry {index}: {key!r} must be a non-empty string")
        values[key] = value
    return SimAccount(
        name=values["name"], client_id=values["client_id"], client_secret=values["client_secret"]
    )
