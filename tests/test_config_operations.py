"""Config keys of the operations issue: the COD guard's pace, on_start, the admin token."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deribit_keeper.config import describe, load_config
from deribit_keeper.errors import ConfigError

ENV = {"MAIN_SECRET": "Hunter2-SECRET-value"}
ACCOUNT = {"name": "main", "client_id": "AbCdEf12", "client_secret": "${MAIN_SECRET}"}


def write(tmp_path: Path, **top: object) -> Path:
    document = {"defaults": {"environment": "test"}, "accounts": [ACCOUNT], **top}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_defaults_keep_orders_and_check_cod_every_minute(tmp_path: Path) -> None:
    (account,) = load_config(write(tmp_path), environ=ENV).accounts
    assert (account.on_start, account.cod_check_interval) == ("keep", 60.0)


def test_on_start_and_cod_check_interval_inherit_from_defaults(tmp_path: Path) -> None:
    defaults = {"environment": "test", "on_start": "cancel_all", "cod_check_interval": 5}
    (account,) = load_config(write(tmp_path, defaults=defaults), environ=ENV).accounts
    assert (account.on_start, account.cod_check_interval) == ("cancel_all", 5.0)


def test_admin_token_is_read_from_its_file_and_never_shown(tmp_path: Path) -> None:
    token = "s3cr3t-admin-token-value"
    (tmp_path / "admin.token").write_text(token + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    http = {"listen": 0, "admin_token_file": "admin.token"}
    config = load_config(write(tmp_path, http=http), environ=ENV)
    assert config.http is not None and config.http.admin_token is not None
    assert config.http.admin_token.reveal() == token
    shown = "\n".join(describe(config)) + repr(config)
    assert token not in shown
    assert f"admin token from file {tmp_path / 'admin.token'}" in shown


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("", "must be one non-empty line"),
        ("a\nb\n", "must be one non-empty line"),
    ],
)
def test_a_bad_admin_token_file_is_a_config_error(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    if content is not None:
        (tmp_path / "admin.token").write_text(content)
    http = {"listen": 0, "admin_token_file": "admin.token"}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, http=http), environ=ENV)
    assert "http.admin_token_file" in str(info.value)
    assert problem in str(info.value)
