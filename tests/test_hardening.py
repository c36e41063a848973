"""``fastknockd --check-config`` and the config permission warnings (no root needed for most)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fastknock import server
from fastknock.conf.config import load_config
from fastknock.conf.permissions import permission_warnings

COMPAT = Path(__file__).parent / "compat"
KEY_HEX = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"


def test_check_config_prints_summary_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "fastknockd.conf"
    shutil.copy(COMPAT / "test-udp.conf", conf)
    conf.chmod(0o600)
    assert server.main(["-c", str(conf), "--check-config"]) == 0
    out, err = capsys.readouterr()
    assert f"config {conf}: OK" in out
    assert "control port 5810/udp" in out and "seccomp kill" in out
    assert "users (1): 12345678" in out
    assert "87654321  port 42/tcp  users all  timeout default" in out
    assert "AABBCCDD  jump input:MYCHAIN-INPUT forward:MYCHAIN-FORWARD" in out
    assert KEY_HEX not in out + err and KEY_HEX.lower() not in (out + err).lower()


def test_check_config_fails_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[GENERAL]\nport = 5800\n[NFTABLES]\nchain-input = X\n[KEYS]\n00000001 = 12\n")
    assert server.main(["-c", str(conf), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"{conf}:6" in err and "64 hex digits" in err


def _server_conf(tmp_path: Path, mode: int) -> Path:
    conf = tmp_path / "fastknockd.conf"
    shutil.copy(COMPAT / "test-tcp.conf", conf)
    conf.chmod(mode)
    return conf


def test_server_config_readable_by_others_warns(tmp_path: Path) -> None:
    conf = _server_conf(tmp_path, 0o644)
    cfg = load_config(conf, "server")
    warnings = permission_warnings(conf, cfg, "server")
    assert any("accessible by others" in w for w in warnings)
    conf.chmod(0o640)
    assert not any("others" in w for w in permission_warnings(conf, cfg, "server"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_server_config_not_owned_by_root_warns(tmp_path: Path) -> None:
    conf = _server_conf(tmp_path, 0o600)
    cfg = load_config(conf, "server")
    assert permission_warnings(conf, cfg, "server") == []
    os.chown(conf, 1, 1)
    assert any("not owned by root" in w for w in permission_warnings(conf, cfg, "server"))


def test_client_config_with_keys_writable_warns(tmp_path: Path) -> None:
    conf = tmp_path / "fastknock.conf"
    conf.write_text(f"[KEYS]\n00000001 = {KEY_HEX}\n")
    cfg = load_config(conf, "client")
    conf.chmod(0o620)
    assert any("writable by group or others" in w for w in permission_warnings(conf, cfg, "client"))
    conf.chmod(0o640)
    assert permission_warnings(conf, cfg, "client") == []  # group-readable is the admin's call


def test_client_config_with_keys_readable_by_others_warns(tmp_path: Path) -> None:
    """Anyone who can read the client config can knock as its user: world-readable is a
    warning when it holds keys; a config without keys may be readable (the control)."""
    conf = tmp_path / "fastknock.conf"
    conf.write_text(f"[KEYS]\n00000001 = {KEY_HEX}\n")
    cfg = load_config(conf, "client")
    conf.chmod(0o644)
    warnings = permission_warnings(conf, cfg, "client")
    assert any("readable by others" in w and "chmod o-rwx" in w for w in warnings), warnings
    bare = tmp_path / "nokeys.conf"
    bare.write_text("[GENERAL]\nport = 5800\n")
    bare.chmod(0o644)
    assert permission_warnings(bare, load_config(bare, "client"), "client") == []


def test_daemon_logs_the_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf = _server_conf(tmp_path, 0o644)
    assert server.main(["-c", str(conf), "--check-config"]) == 0
    assert "accessible by others" in caplog.text


def test_client_prints_the_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastknock import cli

    conf = tmp_path / "fastknock.conf"
    conf.write_text(f"[KEYS]\n00000001 = {KEY_HEX}\n")
    conf.chmod(0o666)
    assert cli.main(["-c", str(conf), "knock", "127.0.0.1", "22", "-u", "1"]) == cli.EXIT_USAGE
    assert "writable by group or others" in capsys.readouterr().err
