"""Root never follows a link planted in a run directory, and fastknockfwd owns no root file.

Finding 1 of issue 12: fastknockd hands ``RUNDIR/fastknockd/`` to its account and (as root,
at the next start) wrote ``fastknockd.pid`` with ``open()`` + ``chown()``, both following
symlinks: the account could make root overwrite and chown any file. fastknockfwd's run
directory now belongs to its own account, so the same holds for its socket and PID file.
Each attack plants the link *as that account* (a forked child that became ``nobody``, the
tests' account for both daemons) and checks that a root-only 0600 target is untouched; the
control in the same test is the normal start before the attack.

Finding 5: fastknockfwd runs as its own account (``nobody`` with ``--test-mode`` here) with
CAP_NET_ADMIN alone: read from /proc/PID/status, and proven by the kernel refusing a root-only
file to a process with exactly the daemon's uid, gids and groups.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastknock.osutil import privs
from tests import netns
from tests.e2e_support import FWD_USER, SERVER_USER, Stack, fwd_only_stack, port_res, wait_for

pytestmark = pytest.mark.e2e

R = port_res(0x501, 2701)
SECRET = "root only\n"


def as_account(name: str, action: object, *args: object) -> int:
    """Run ``action(*args)`` in a forked child that became ``name`` (uid, gid, no groups);
    0 if it returned, else the errno of the OSError it raised (1 for anything else)."""
    pw = pwd.getpwnam(name)
    return as_ids(pw.pw_uid, pw.pw_gid, [], action, *args)


def as_ids(uid: int, gid: int, groups: list[int], action: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            action(*args)  # type: ignore[operator]
            code = 0
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def root_only(path: Path) -> Path:
    path.write_text(SECRET)
    os.chown(path, 0, 0)
    path.chmod(0o600)
    return path


def untouched(path: Path) -> bool:
    st = os.lstat(path)
    return (
        stat.S_ISREG(st.st_mode)
        and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
        and path.read_text() == SECRET
    )


def pid_in(path: Path) -> str:
    """The PID file's text, or "" while it does not exist yet."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def pid_file_ok(path: Path, pid: int, owner: str) -> bool:
    st = os.lstat(path)
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == pwd.getpwnam(owner).pw_uid
        and path.read_text().strip() == str(pid)
    )


@pytest.fixture
def stack() -> Iterator[Stack]:
    with fwd_only_stack("links", [R]) as s:
        yield s


def test_fastknockd_pid_file_link_is_not_followed(stack: Stack) -> None:
    pid_file = stack.rundir / "fastknockd" / "fastknockd.pid"
    server = stack.start_server()  # control: a normal start
    assert pid_file_ok(pid_file, server.pid, SERVER_USER)
    assert server.stop() == 0 and not pid_file.exists()
    target = root_only(stack.work / "target")
    assert as_account(SERVER_USER, os.symlink, str(target), str(pid_file)) == 0  # the attack
    assert os.path.islink(pid_file)
    server = stack.start_server()
    assert untouched(target), "root followed the planted link"
    assert pid_file_ok(pid_file, server.pid, SERVER_USER)


def test_fastknockfwd_socket_and_pid_file_links_are_not_followed(stack: Stack) -> None:
    assert stack.fwd is not None
    run = stack.rundir / "fastknockfwd"
    pid_file, sock = run / "fastknockfwd.pid", run / "fastknockfwd.sock"
    wait_for("the PID file", lambda: pid_in(pid_file) != "")
    assert pid_file_ok(pid_file, stack.fwd.pid, FWD_USER)  # control: a normal start
    assert stack.fwd.stop() == 0
    targets = [root_only(stack.work / "t-pid"), root_only(stack.work / "t-sock")]
    for link, target in ((pid_file, targets[0]), (sock, targets[1])):
        if os.path.lexists(link):
            assert as_account(FWD_USER, os.unlink, str(link)) == 0  # the account may
        assert as_account(FWD_USER, os.symlink, str(target), str(link)) == 0
    fwd = stack.start_fwd()
    wait_for("the PID file", lambda: pid_in(pid_file) == str(fwd.pid))
    assert all(untouched(t) for t in targets), "root followed a planted link"
    assert pid_file_ok(pid_file, fwd.pid, FWD_USER)
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    server, me, _ = stack.addrs(False)
    stack.start_server()
    k = stack.knock("knock", server, str(R.probe), "-4")
    assert k.code == 0, k.err
    assert stack.connects(me, server, R.probe)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def _append(path: str) -> None:
    with open(path, "ab"):
        pass


def test_fastknockfwd_runs_as_its_own_account_with_net_admin_only(stack: Stack) -> None:
    assert stack.fwd is not None
    wait_for("fastknockfwd", lambda: "listening on" in stack.fwd.text())  # type: ignore[union-attr]
    st = _status(stack.fwd.pid)
    pw = pwd.getpwnam(FWD_USER)
    assert st["Uid"].split() == [str(pw.pw_uid)] * 4
    assert st["Gid"].split() == [str(pw.pw_gid)] * 4
    net_admin = 1 << privs.CAP_NET_ADMIN
    for cap in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == net_admin, cap
    assert st["NoNewPrivs"] == "1"
    # The kernel's answer for exactly those credentials: a root-only file is closed to them
    # (as uid 0 it was the owner's: readable and writable without any capability).
    target = root_only(stack.work / "root-file")
    groups = [int(g) for g in st["Groups"].split()]
    uid, gid = int(st["Uid"].split()[0]), int(st["Gid"].split()[0])
    control = pwd.getpwnam("root")
    assert as_ids(control.pw_uid, control.pw_gid, [], _read, str(target)) == 0  # control
    for action in (_read, _append):
        assert as_ids(uid, gid, groups, action, str(target)) != 0, action.__name__
    assert as_ids(uid, gid, groups, _read, "/etc/shadow") != 0
    # ...and the daemon still does its job with what it kept.
    stack.start_server()
    server, me, _ = stack.addrs(False)
    k = stack.knock("knock", server, str(R.probe), "-4")
    assert k.code == 0, k.err
    assert stack.connects(me, server, R.probe)


def test_fwd_instance_lock_is_a_flock_not_a_pid(stack: Stack) -> None:
    """A PID file naming some other process whose command line says "fastknockfwd" (a stale
    file after a crash, the PID reused by any user's process) no longer blocks the start;
    a running instance still does (the control: its lock is held)."""
    assert stack.fwd is not None
    run = stack.rundir / "fastknockfwd"
    pid_file = run / "fastknockfwd.pid"
    wait_for("the PID file", lambda: pid_in(pid_file) == str(stack.fwd.pid))  # type: ignore[union-attr]
    second = [sys.executable, "-m", "fastknock.fwd", "-c", str(stack.server_conf), "--rundir",
              str(stack.rundir), "--test-mode", "--server-user", SERVER_USER, "--user", FWD_USER,
              "--no-systemd"]  # fmt: skip
    proc = netns.run(stack.pair.server, second, timeout=60)
    assert proc.returncode == 1 and "already running" in proc.stderr, proc.stderr  # control
    assert stack.fwd.stop(signal.SIGKILL) != 0  # crashed: the PID file stays behind
    pw = pwd.getpwnam(FWD_USER)
    fake = subprocess.Popen(  # any account's process with "fastknockfwd" in its command line
        ["fastknockfwd", "120"], executable=shutil.which("sleep"),
        user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
    )  # fmt: skip
    try:
        pid_file.write_text(f"{fake.pid}\n")
        fwd = stack.start_fwd()
        wait_for("the PID file", lambda: pid_in(pid_file) == str(fwd.pid))
        assert fwd.alive() and fake.poll() is None
    finally:
        fake.kill()  # ours, by PID
        fake.wait()
