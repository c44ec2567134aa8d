"""The deribit-keeper command as an operator uses it: exit codes, one-line errors, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from deribit_keeper.cli import EX_CONFIG, main
from deribit_keeper.simulator import Simulator

from .conftest import SECRETS, SIM_ACCOUNTS, LogLines

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, url: str, *, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            log: {{level: debug, format: json}}
            defaults:
              url: {url}
              heartbeat_interval: 10
            accounts:
              - name: main
                client_id: main-id
                client_secret: ${{MAIN_SECRET}}
              - name: hedge
                client_id: hedge-id
                client_secret_file: hedge.secret
            """
        )
        + extra
    )
    (tmp_path / "hedge.secret").write_text(SIM_ACCOUNTS[1].client_secret + "\n")
    (tmp_path / "hedge.secret").chmod(0o600)
    return path


def test_check_prints_a_summary_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check: exit 0 and a summary naming accounts, endpoint and auth, never the secrets."""
    monkeypatch.setenv("MAIN_SECRET", SIM_ACCOUNTS[0].client_secret)
    path = write_config(tmp_path, "ws://127.0.0.1:8765/ws/api/v2")
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "main" in out and "hedge" in out and "ws://127.0.0.1:8765/ws/api/v2" in out
    assert not any(secret in out for secret in SECRETS)


def test_check_reports_a_bad_key_in_one_line_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config error is one stderr line with file and key path, no traceback, exit 78."""
    monkeypatch.setenv("MAIN_SECRET", "x")
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    path.write_text(path.read_text().replace("heartbeat_interval: 10", "heartbeat_interval: 5"))
    assert main(["check", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and "defaults.heartbeat_interval" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "check"])
def test_an_unset_secret_variable_exits_78_for_run_and_check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """${VAR} unset: both run and check refuse with exit 78 and name the variable."""
    monkeypatch.delenv("MAIN_SECRET", raising=False)
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    assert main([command, "--config", str(path)]) == EX_CONFIG
    assert "MAIN_SECRET" in capsys.readouterr().err


def test_missing_config_file_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default path comes from $DERIBIT_KEEPER_CONFIG; a missing file is a config error."""
    monkeypatch.setenv("DERIBIT_KEEPER_CONFIG", str(tmp_path / "nope.yaml"))
    assert main(["run"]) == EX_CONFIG
    assert "nope.yaml" in capsys.readouterr().err


def test_simulate_rejects_a_bad_accounts_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """simulate with a malformed accounts file: exit 78 and one line naming the file."""
    bad = tmp_path / "accounts.yaml"
    bad.write_text("- name: a\n")
    assert main(["simulate", "--port", "0", "--accounts", str(bad)]) == EX_CONFIG
    assert "accounts.yaml" in capsys.readouterr().err


async def test_run_as_a_process_reaches_ready_and_exits_0_on_sigterm(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The real command: sessions become ready, SIGTERM stops them, exit 0 within 5 s."""
    sim = Simulator(list(SIM_ACCOUNTS))
    await nursery.start(sim.serve, 0)
    path = write_config(tmp_path, sim.url)
    env = {**os.environ, "MAIN_SECRET": SIM_ACCOUNTS[0].client_secret}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deribit_keeper", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    lines: list[dict[str, object]] = []
    buffer = b""
    with trio.fail_after(20):
        ready: set[object] = set()
        while len(ready) < 2:
            chunk = await process.stdout.receive_some()
            assert chunk, "keeper exited early"
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                lines.append(json.loads(raw))
                if lines[-1]["event"] == "session.ready":
                    ready.add(lines[-1]["account"])
        process.send_signal(signal.SIGTERM)
        stopped_at = trio.current_time()
        rest = b""
        while chunk := await process.stdout.receive_some():
            rest += chunk
        code = await process.wait()
    assert code == 0
    assert trio.current_time() - stopped_at < 5
    events = [json.loads(raw)["event"] for raw in (buffer + rest).splitlines() if raw.strip()]
    assert events[-1] == "keeper.stopped" and "keeper.stopping" in events
    output = json.dumps(lines) + (buffer + rest).decode()
    assert not any(secret in output for secret in SECRETS)
    await sim.wait_for(lambda: not any(c.open for c in sim.connections))
    assert all(c.cod_fired for c in sim.connections)


def test_an_unexpected_crash_is_logged_and_exits_1(
    tmp_path: Path, log_lines: LogLines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that escapes everything becomes one keeper.crashed event and exit code 1."""
    from deribit_keeper.supervisor import Keeper

    async def explode(self: Keeper, **_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Keeper, "run", explode)
    monkeypatch.setenv("MAIN_SECRET", SIM_ACCOUNTS[0].client_secret)
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    assert main(["run", "--config", str(path)]) == 1
    (crashed,) = log_lines.events()
    assert crashed["event"] == "keeper.crashed" and crashed["level"] == "error"
    assert "RuntimeError: a bug" in crashed["exception"]


@pytest.mark.parametrize("shard", ["3/3", "x", "1/0"])
def test_a_bad_shard_exits_78(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    shard: str,
) -> None:
    """--shard must be INDEX/COUNT with INDEX below COUNT; anything else is a config error."""
    monkeypatch.setenv("MAIN_SECRET", "x")
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    assert main(["run", "--config", str(path), "--shard", shard]) == EX_CONFIG
    assert "shard" in capsys.readouterr().err


def test_a_bad_shard_variable_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad $DERIBIT_KEEPER_SHARD names the variable, since the operator may not have set it."""
    monkeypatch.setenv("MAIN_SECRET", "x")
    monkeypatch.setenv("DERIBIT_KEEPER_SHARD", "2/2")
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    assert main(["run", "--config", str(path)]) == EX_CONFIG
    assert "DERIBIT_KEEPER_SHARD" in capsys.readouterr().err


def test_probe_of_nothing_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """deribit-keeper probe URL exits 1 with one line when nothing answers."""
    assert main(["probe", "http://127.0.0.1:1/healthz", "--timeout", "0.5"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_check_prints_config_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check shows a group/world-readable secret file as a warning, and still passes."""
    monkeypatch.setenv("MAIN_SECRET", "x")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = write_config(tmp_path, "ws://127.0.0.1:1/ws/api/v2")
    (tmp_path / "hedge.secret").chmod(0o644)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: accounts[1].client_secret_file" in out and "0644" in out
