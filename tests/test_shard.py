"""Tests for shard.py: the partition, its stability, minimal movement, balance and parsing.

Balance and movement are measured on 1,000 fixed names, so the numbers are deterministic; the
bounds are four binomial standard deviations, which a uniform hash meets and a skewed one does not.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deribit_keeper.config import AccountConfig, Secret
from deribit_keeper.shard import (
    SHARD_VAR,
    Shard,
    configured_shard,
    parse_shard,
    select,
    shard_of,
)

NAMES = [f"account-{i:04d}" for i in range(1000)]
# Valid account names (config.py: [A-Za-z0-9_.-]{1,64}).
names = st.lists(
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", min_size=1, max_size=64
    ),
    unique=True,
    max_size=20,
)
counts = st.integers(min_value=1, max_value=16)


def account(name: str) -> AccountConfig:
    return AccountConfig(
        name=name, client_id="id", client_secret=Secret("s"), url="wss://x", environment=None
    )


def within_4_sigma(observed: int, trials: int, p: float) -> bool:
    return abs(observed - trials * p) <= 4 * math.sqrt(trials * p * (1 - p))


@given(names, counts)
def test_every_account_is_in_exactly_one_shard(account_names: list[str], count: int) -> None:
    """The shards of one COUNT are disjoint and together hold every account, in config order."""
    accounts = [account(n) for n in account_names]
    parts = [select(accounts, Shard(i, count)) for i in range(count)]
    held = [a.name for part in parts for a in part]
    assert sorted(held) == sorted(account_names)
    for part in parts:
        mine = {a.name for a in part}
        assert [a.name for a in part] == [n for n in account_names if n in mine]


def test_no_shard_means_every_account() -> None:
    """``select`` with no shard keeps every account, in order."""
    accounts = [account(n) for n in ("b", "a", "c")]
    assert select(accounts, None) == tuple(accounts)


def test_golden_values_pin_the_hash() -> None:
    """The choice is pinned: changing the hash would reshuffle every running fleet."""
    golden = {
        "main": [0, 0, 0, 0, 0],
        "hedge": [1, 1, 1, 7, 7],
        "alpha": [1, 2, 2, 7, 12],
        "account-0000": [0, 0, 3, 6, 6],
    }
    for name, expected in golden.items():
        assert [shard_of(name, count) for count in (2, 3, 5, 8, 16)] == expected, name


@given(names, counts)
def test_growing_moves_accounts_only_onto_the_new_shard(
    account_names: list[str], count: int
) -> None:
    """From COUNT to COUNT+1 an account either stays or moves to the new shard COUNT."""
    for name in account_names:
        after = shard_of(name, count + 1)
        assert after in (shard_of(name, count), count)


@given(names, st.integers(min_value=2, max_value=16))
def test_shrinking_moves_only_the_removed_shards_accounts(
    account_names: list[str], count: int
) -> None:
    """From COUNT to COUNT-1 only accounts of the removed shard COUNT-1 move."""
    for name in account_names:
        before = shard_of(name, count)
        if before != count - 1:
            assert shard_of(name, count - 1) == before


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 15])
def test_growing_moves_about_one_in_count_plus_one(count: int) -> None:
    """Adding a shard moves about 1/(COUNT+1) of 1,000 accounts, not a reshuffle."""
    moved = sum(shard_of(n, count) != shard_of(n, count + 1) for n in NAMES)
    assert within_4_sigma(moved, len(NAMES), 1 / (count + 1)), moved


@pytest.mark.parametrize("count", [2, 3, 4, 7, 16])
def test_shards_are_balanced(count: int) -> None:
    """Each of COUNT shards holds about 1,000/COUNT of 1,000 accounts."""
    sizes = [0] * count
    for name in NAMES:
        sizes[shard_of(name, count)] += 1
    assert all(within_4_sigma(size, len(NAMES), 1 / count) for size in sizes), sizes


def test_shard_reads_as_index_slash_count() -> None:
    """A shard prints in the form it is given in, and parsing tolerates spaces."""
    assert str(Shard(2, 5)) == "2/5"
    assert parse_shard(" 2 / 5\n") == Shard(2, 5)
    assert parse_shard("0/1") == Shard(0, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "shard '3/3': INDEX must be below COUNT (0..2)"),
        ("0/0", "shard '0/0': COUNT must be at least 1"),
        ("0/5000", "shard '0/5000': COUNT must be at most 1024"),
        ("1/" + "9" * 5000, "COUNT must be at most 1024"),
        ("-1/3", "shard '-1/3': expected INDEX/COUNT, e.g. 0/3, with 0 <= INDEX < COUNT"),
        ("1", "expected INDEX/COUNT"),
        ("1/2/3", "expected INDEX/COUNT"),
        ("a/3", "expected INDEX/COUNT"),
        ("1.0/3", "expected INDEX/COUNT"),
        ("", "shard '': expected INDEX/COUNT"),
        ("\u0661/3", "expected INDEX/COUNT"),  # an Arabic-Indic digit one: ASCII digits only
    ],
)
def test_parse_shard_rejects_with_one_line(text: str, message: str) -> None:
    """A bad shard is one line saying what is wrong and the form expected."""
    with pytest.raises(ValueError) as caught:
        parse_shard(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_shard_refuses_impossible_values() -> None:
    """A Shard cannot be built out of range, so every Shard in the program is valid."""
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        Shard(3, 3)
    with pytest.raises(ValueError, match=r"must be 1\.\.1024, got 0"):
        shard_of("main", 0)


def test_option_wins_over_variable_and_empty_variable_is_unset() -> None:
    """``--shard`` beats ``$DERIBIT_KEEPER_SHARD``; an empty variable means every account."""
    assert configured_shard("1/2", {SHARD_VAR: "0/3"}) == Shard(1, 2)
    assert configured_shard(None, {SHARD_VAR: "2/3"}) == Shard(2, 3)
    assert configured_shard(None, {SHARD_VAR: " "}) is None
    assert configured_shard(None, {}) is None


def test_bad_variable_is_named_in_the_error() -> None:
    """An invalid ``$DERIBIT_KEEPER_SHARD`` says it came from the variable."""
    with pytest.raises(ValueError, match=r"^DERIBIT_KEEPER_SHARD: shard '\$\(POD_INDEX\)/3'"):
        configured_shard(None, {SHARD_VAR: "$(POD_INDEX)/3"})
