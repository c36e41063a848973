"""fastknock-install below a temporary root: files, modes, matching keys, units, man pages;
idempotent; uninstall removes units and pages and keeps the keys; the units as
``systemd-analyze verify`` reads them; ProtectHome= with an installation below a home."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock import install
from fastknock.conf.config import load_config

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_and_uninstall(tmp_path: Path) -> None:
    assert install.main(["--root", str(tmp_path), "--bindir", "/opt/fk/bin"]) == 0
    etc = tmp_path / "etc" / "fastknock"
    assert mode(etc) == 0o750
    assert mode(etc / "fastknockd.conf") == 0o640 and mode(etc / "fastknock.conf") == 0o600
    server = load_config(etc / "fastknockd.conf", "server")
    client = load_config(etc / "fastknock.conf", "client")
    assert server.keys[1] == client.keys[1] and len(server.keys[1]) == 32
    assert client.default_user == 1 and server.nftables is not None
    assert "LETMEIN-INPUT" in (etc / "nftables.conf.example").read_text()
    units = tmp_path / "etc" / "systemd" / "system"
    for name in install.UNITS:
        text = (units / name).read_text()
        assert "@BINDIR@" not in text
        if name.endswith(".service"):
            assert "ExecStart=/opt/fk/bin/" in text and "Type=notify" in text
            assert "NoNewPrivileges=yes" in text and "SystemCallFilter=" in text
    assert "User=fastknock" in (units / "fastknockd.service").read_text()
    assert "CapabilityBoundingSet=\n" in (units / "fastknockd.service").read_text()

    before = (etc / "fastknockd.conf").read_bytes()
    assert install.main(["--root", str(tmp_path)]) == 0  # idempotent: keys are kept
    assert (etc / "fastknockd.conf").read_bytes() == before

    assert install.main(["--root", str(tmp_path), "--uninstall"]) == 0
    assert not any((units / name).exists() for name in install.UNITS)
    assert (etc / "fastknockd.conf").read_bytes() == before
    assert not (tmp_path / "usr" / "local" / "share" / "man" / "man8" / "fastknockd.8").exists()


def test_man_pages_installed(tmp_path: Path) -> None:
    assert install.main(["--root", str(tmp_path), "--bindir", "/opt/fk/bin"]) == 0
    man = tmp_path / "usr" / "local" / "share" / "man"
    assert sorted(str(p.relative_to(man)) for p in man.rglob("*.[158]")) == [
        "man1/fastknock.1",
        "man5/fastknock.conf.5",
        "man8/fastknock-install.8",
        "man8/fastknockd.8",
        "man8/fastknockfwd.8",
    ]


def test_protect_home_keeps_an_installation_below_home_visible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ProtectHome=yes would hide a venv in /root or /home (the unit could not even exec
    it): then only those directories are bound in, read-only. Control: /opt stays as is."""
    template = (REPO / "fastknock" / "units" / "fastknockd.service").read_text()
    monkeypatch.setattr(sys, "prefix", "/opt/fastknock")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    plain = install.unit_text(template, "/opt/fastknock/bin")
    assert "ProtectHome=yes\n" in plain and "BindReadOnlyPaths" not in plain
    monkeypatch.setattr(sys, "prefix", "/root/venv")
    monkeypatch.setattr(sys, "base_prefix", "/home/alice/.pyenv/versions/3.11.7")
    text = install.unit_text(template, "/root/venv/bin")
    assert "ProtectHome=yes" not in text
    assert (
        "ProtectHome=tmpfs\nBindReadOnlyPaths=/root/venv /home/alice/.pyenv/versions/3.11.7\n"
        in text
    )
    # ...but /root is 0700 (systemd's tmpfs for it as well): fastknockd's account cannot
    # enter it, which fastknock-install says. Below /home the bind is enough.
    warning = install.root_only_warning("/root/venv/bin")
    assert warning is not None and "/root/venv" in warning and "/opt/fastknock" in warning
    monkeypatch.setattr(sys, "prefix", "/home/alice/venv")
    assert install.root_only_warning("/home/alice/venv/bin") is None
    home = install.unit_text(template, "/home/alice/venv/bin")
    assert "BindReadOnlyPaths=/home/alice/venv /home/alice/.pyenv/versions/3.11.7\n" in home


def _verify(units: Path, man: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", MANPATH=str(man), SYSTEMD_PAGER="")
    return subprocess.run(
        ["systemd-analyze", "verify", *(str(units / name) for name in install.UNITS)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The installed units as systemd reads them: every directive parses, ExecStart is an
    executable of this installation, and each Documentation= page is installed (verify
    runs man for it). Control: a unit naming a missing page fails."""
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing (apt package systemd)")
        pytest.skip("systemd-analyze missing (apt package systemd)")
    bindir = install.default_bindir()
    if not os.access(os.path.join(bindir, "fastknockd"), os.X_OK):
        pytest.skip("fastknock's programs are not installed (make setup installs them)")
    assert install.main(["--root", str(tmp_path)]) == 0
    units = tmp_path / "etc" / "systemd" / "system"
    man = tmp_path / "usr" / "local" / "share" / "man"
    assert f"ExecStart={bindir}/fastknockd " in (units / "fastknockd.service").read_text()
    proc = _verify(units, man)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    service = units / "fastknockfwd.service"
    service.write_text(service.read_text().replace("fastknockfwd(8)", "fastknock-nosuch(8)"))
    proc = _verify(units, man)
    assert proc.returncode != 0 and "fastknock-nosuch" in proc.stderr


def _listen_lines(root: Path) -> list[str]:
    text = (root / "etc" / "systemd" / "system" / "fastknockd.socket").read_text()
    return [line for line in text.splitlines() if line.startswith("Listen")]


def test_socket_unit_follows_the_config(tmp_path: Path) -> None:
    """The generated config says ``5800 / udp``: the socket unit listens on UDP 5800 only
    (it used to add TCP, which socket activation then served). A kept config with another
    port and both transports gets exactly those."""
    assert install.main(["--root", str(tmp_path), "--bindir", "/opt/fk/bin"]) == 0
    assert _listen_lines(tmp_path) == ["ListenDatagram=5800"]
    conf = tmp_path / "etc" / "fastknock" / "fastknockd.conf"
    conf.write_text(conf.read_text().replace("port = 5800 / udp", "port = 6100 / tcp, udp"))
    assert install.main(["--root", str(tmp_path), "--bindir", "/opt/fk/bin"]) == 0
    assert _listen_lines(tmp_path) == ["ListenDatagram=6100", "ListenStream=6100"]
    conf.write_text(conf.read_text().replace("port = 6100 / tcp, udp", "port = 6100 / tcp"))
    assert install.main(["--root", str(tmp_path), "--bindir", "/opt/fk/bin"]) == 0
    assert _listen_lines(tmp_path) == ["ListenStream=6100"]


def test_broken_kept_config_is_a_clear_error(tmp_path: Path) -> None:
    assert install.main(["--root", str(tmp_path)]) == 0
    conf = tmp_path / "etc" / "fastknock" / "fastknockd.conf"
    conf.write_text(conf.read_text().replace("port = 5800 / udp", "port = 5800 / sctp"))
    assert install.main(["--root", str(tmp_path)]) == 1
