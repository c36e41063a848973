"""fastknock-install below a temporary root: files, modes, matching keys, units; idempotent;
uninstall removes the units and keeps the keys."""

from __future__ import annotations

import stat
from pathlib import Path

from fastknock import install
from fastknock.conf.config import load_config


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
