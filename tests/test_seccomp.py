"""seccomp filters are real: a forbidden syscall kills the filtered process in ``kill`` mode,
is only logged in ``log`` mode, and ordinary work (files, sockets, threads) keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastknock.osutil import seccomp

pytest.importorskip("pyseccomp")
ROOT = str(Path(__file__).resolve().parents[1])


def run_child(
    body: str, mode: str = "kill", profile: str = "server"
) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import os, socket, sys, threading
        from fastknock.osutil import seccomp
        # Like the daemons: bind first, then install the filter.
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
        seccomp.install({mode!r}, {profile!r})
        # Ordinary work stays allowed: a UDP round trip on loopback, a thread, a file read.
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b.sendto(b"ping", a.getsockname()); assert a.recv(10) == b"ping"
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        open({__file__!r}, "rb").read(10)
        print("alive", flush=True)
        """
    ) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("profile", ["server", "fwd", "client"])
def test_allowed_work_survives_kill_mode(profile: str) -> None:
    proc = run_child("print('done')", profile=profile)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["alive", "done"]


@pytest.mark.parametrize(
    "forbidden",
    [
        "os.execv('/bin/true', ['true'])",
        "os.fork()",
        "import ctypes; ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0)",  # PTRACE_TRACEME
    ],
    ids=["execve", "fork", "ptrace"],
)
def test_forbidden_syscall_kills_in_kill_mode(forbidden: str) -> None:
    proc = run_child(forbidden + "\nprint('survived')")
    assert proc.stdout.split() == ["alive"]
    assert proc.returncode == -signal.SIGSYS


@pytest.mark.parametrize("call", ["getpid()", "personality(0xFFFFFFFF)"])
def test_a_thread_started_before_the_filter_is_filtered_too(call: str) -> None:
    """A thread started before the filter is installed (an executor thread, a C receive
    thread) is covered too (TSYNC). Control: the same thread making an allowed call lives on."""
    code = textwrap.dedent(
        f"""
        import ctypes, threading
        from fastknock.osutil import seccomp
        go, done = threading.Event(), threading.Event()
        def early():
            go.wait()
            ctypes.CDLL(None).{call}  # personality(0xFFFFFFFF) only asks: harmless if let through
            done.set()
        t = threading.Thread(target=early); t.start()
        seccomp.install("kill", "server")
        go.set(); done.wait(10); t.join()
        print("survived", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    if call == "getpid()":
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["survived"]
    else:
        assert proc.returncode == -signal.SIGSYS
        assert proc.stdout == ""


def test_log_mode_only_logs() -> None:
    proc = run_child(
        "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)\nprint('survived')", mode="log"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["alive", "survived"]


def test_off_installs_nothing_and_bad_mode_is_refused() -> None:
    seccomp.install("off", "server")  # no filter in the test process itself
    with pytest.raises(ValueError):
        seccomp.install("strict", "server")


def test_lists_exclude_process_creation() -> None:
    for profile in ("server", "fwd", "client"):
        names = set(seccomp.syscalls(profile))  # type: ignore[arg-type]
        assert not names & {"execve", "execveat", "fork", "vfork", "ptrace", "clone", "clone3"}
