"""Privilege drop for real, in child processes started as root (read back from /proc)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock.errors import PrivilegeError
from fastknock.osutil import privs

ROOT = str(Path(__file__).resolve().parents[1])
needs_root = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="root")


def child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


@needs_root
def test_drop_to_nobody_leaves_no_capabilities() -> None:
    proc = child(
        "import os; from fastknock.osutil import privs\n"
        "assert privs.drop_to('nobody')\n"
        "c = privs.capabilities()\n"
        "print(os.getresuid(), os.getresgid(), os.getgroups(), c['CapEff'], c['CapPrm'])\n"
        "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('cannot regain root')\n"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    uid = privs.lookup("nobody")[0]
    gid = privs.lookup("nobody")[1]
    assert lines[0] == f"{(uid,) * 3} {(gid,) * 3} [] 0 0"
    assert lines[1] == "cannot regain root"


@needs_root
def test_keep_only_net_admin(tmp_path: Path) -> None:
    victim = tmp_path / "f"
    victim.write_text("x")
    os.chown(victim, 1, 1)  # root with all capabilities can do this...
    proc = child(
        "from fastknock.osutil import privs\n"
        "assert privs.keep_only_net_admin()\n"
        "c = privs.capabilities()\n"
        "print(hex(c['CapEff']), hex(c['CapBnd']))\n"
        "import os\n"
        f"try:\n    os.chown({str(victim)!r}, 2, 2)\nexcept PermissionError:\n"
        "    print('no chown')\n"
    )  # ...but not with CAP_NET_ADMIN alone
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [hex(1 << 12), hex(1 << 12), "no", "chown"]


def test_missing_account_says_how_to_create_it() -> None:
    with pytest.raises(PrivilegeError, match="useradd --system"):
        privs.lookup("fastknock-no-such-user")


def test_not_root_is_a_no_op() -> None:
    proc = child(
        "import os; from fastknock.osutil import privs\n"
        "os.setresuid(65534, 65534, 65534) if os.geteuid() == 0 else None\n"
        "print(privs.drop_to('nobody'), privs.keep_only_net_admin())\n"
    )
    assert proc.stdout.split() == ["False", "False"], proc.stderr


@needs_root
def test_libc_is_looked_up_once() -> None:
    """``find_library`` runs ``ldconfig -p`` in a subprocess; the ~40 prctl calls of a drop
    must not (a slow drop leaves a half-dropped process visible for long). Control: the
    counter sees the first lookup."""
    proc = child(
        "import ctypes.util; from fastknock.osutil import privs\n"
        "real, calls = ctypes.util.find_library, []\n"
        "ctypes.util.find_library = lambda name: calls.append(name) or real(name)\n"
        "privs.no_new_privs()\n"
        "first = len(calls)\n"
        "assert privs.keep_only_net_admin()\n"
        "print(first, len(calls))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"]
