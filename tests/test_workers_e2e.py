"""fastknockd ``--workers`` and ``--metrics-file`` end to end (namespaces, both daemons).

Two workers on one SO_REUSEPORT group serve knocks from 24 source ports: every knock
completes (KNOCK -> CHALLENGE -> RESPONSE -> COMEIN, judged with the independent codec of
``tests.e2e_support``), both workers took part (the kernel spreads by source port; all 24
on one worker has probability 2**-23), and the per-worker metrics files add up to what was
sent, including forged KNOCKs that the batched path rejected in C. SIGTERM to the parent
stops the workers too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.e2e_peers import KNOCK, flip, signed
from tests.e2e_support import KEY1, SERVER_USER, USER1, Stack, port_res, wait_for

pytestmark = pytest.mark.e2e

RES = port_res(0x00000022, 2222)
KNOCKS = 24
FORGED = 10


@pytest.fixture
def metrics_dir() -> Iterator[Path]:
    """A directory fastknockd can write after dropping root (to SERVER_USER)."""
    top = Path(tempfile.mkdtemp(prefix="fk-metrics-"))
    try:
        top.chmod(0o755)
        d = top / "textfile"
        d.mkdir()
        pw = pwd.getpwnam(SERVER_USER)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        yield d
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def stack(metrics_dir: Path) -> Iterator[Stack]:
    netns.require()
    s = Stack(
        "workers",
        [RES],
        server_args=[
            "--workers",
            "2",
            "--metrics-file",
            str(metrics_dir / "fastknockd.prom"),
            "--metrics-interval",
            "0.1",
        ],
    )
    try:
        yield s
    finally:
        s.close()


def _worker_pids(stack: Stack) -> list[int]:
    """The PIDs the supervisor logs once it has forked every worker (a worker may be
    serving, and the stack ready, before that line is written)."""
    pattern = re.compile(r"workers started: pids ([\d ]+)\n")
    wait_for("workers started", lambda: pattern.search(stack.server_log()) is not None)
    match = pattern.search(stack.server_log())
    assert match is not None
    return [int(p) for p in match.group(1).split()]


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*{labels}[^}}]*\}} (\S+)$", text, re.M)
    if m is None:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} {labels} missing in:\n{text}"
    return float(m.group(1))


def _knock(stack: Stack, src: str) -> bool:
    return stack.knock_once(src, RES.id) is not None


def test_two_workers_serve_and_count(stack: Stack, metrics_dir: Path) -> None:
    assert stack.server is not None
    pids = _worker_pids(stack)
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
    _, me, other = stack.addrs(v6=False)
    assert all(_knock(stack, me) for _ in range(KNOCKS))
    peer = stack.udp(other)
    for _ in range(FORGED):
        peer.send(flip(signed(KEY1, KNOCK, USER1, RES.id), 40))
    assert peer.drain(0.3) == []  # stealth: nothing back
    peer.close()

    files = [metrics_dir / "fastknockd.worker0.prom", metrics_dir / "fastknockd.worker1.prom"]

    def totals() -> tuple[float, float, list[float]]:
        texts = [f.read_text() if f.exists() else "" for f in files]
        if not all(texts):
            return 0, 0, []
        knocks = [_metric(t, "fastknockd_knocks_total") for t in texts]
        macs = sum(_metric(t, "fastknockd_rejected_total", 'reason="mac"') for t in texts)
        return sum(knocks), macs, knocks

    wait_for("metrics", lambda: totals()[:2] == (KNOCKS, FORGED))
    _, _, per_worker = totals()
    assert all(k > 0 for k in per_worker), per_worker  # both workers served knocks
    text = files[0].read_text()
    assert 'worker="0"' in text and 'reader="' in text and 'udp_path="batched"' in text

    assert stack.server.stop() == 0
    wait_for("workers gone", lambda: not any(os.path.exists(f"/proc/{p}") for p in pids))
    assert "Traceback" not in stack.server_log()


def test_a_dead_worker_stops_the_group(stack: Stack) -> None:
    assert stack.server is not None
    pids = _worker_pids(stack)
    os.kill(pids[0], signal.SIGKILL)  # our own child process, by PID
    wait_for("group stopped", lambda: not stack.server.alive())  # type: ignore[union-attr]
    assert stack.server.proc.returncode == 128 + signal.SIGKILL
    assert not os.path.exists(f"/proc/{pids[1]}")


def test_sighup_reloads_every_worker(stack: Stack) -> None:
    """SIGHUP to the supervising parent reaches each worker (they reload; the group lives)."""
    assert stack.server is not None
    pids = _worker_pids(stack)
    stack.server.send_signal(signal.SIGHUP)
    wait_for("both workers reloaded", lambda: stack.server_log().count("reloaded ") == 2)
    assert stack.server.alive() and all(os.path.exists(f"/proc/{p}") for p in pids)
    _, me, _ = stack.addrs(v6=False)
    assert _knock(stack, me)
    assert stack.server.stop() == 0


def test_workers_under_seccomp_kill() -> None:
    """Each worker installs the allow-list after the fork and still serves knocks."""
    netns.require()
    s = Stack("wkill", [RES], server_args=["--workers", "2", "--seccomp", "kill"])
    try:
        _, me, _ = s.addrs(v6=False)
        assert all(_knock(s, me) for _ in range(6))
        installed = "seccomp (kill) installed for server"
        wait_for("both filters", lambda: s.server_log().count(installed) == 2)
        assert s.server is not None and s.server.stop() == 0
        assert "Traceback" not in s.server_log()
    finally:
        s.close()


def _catches_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def _bound(pid: int) -> bool:
    """Whether ``pid`` holds sockets (fastknockd binds before forking its workers)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    links = []
    for fd in fds:
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sum(link.startswith("socket:") for link in links) >= 2


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_sighup_while_workers_start_kills_nothing() -> None:
    """SIGHUP, again and again, to every process of the group from the moment it can catch
    one until both workers serve: no process dies (the default action of a SIGHUP that
    arrives before the handler), and the group then serves knocks. The parent is signalled
    once SigCgt shows its handler (a SIGHUP before the interpreter even runs main() kills
    any program); a worker (a fork of a running main(), after the parent bound its
    sockets) from its first moment: each is stopped as soon as it appears, sent SIGHUP while
    stopped, and continued, so the signal always lands before the worker's loop is up.
    """
    netns.require()
    stack = Stack("hup", [RES], server_args=["--workers", "2"], start_server=False)
    done = threading.Event()
    sent = [0]

    def hup(pid: int) -> None:  # only our own daemon's processes, by PID
        try:
            os.kill(pid, signal.SIGHUP)
            sent[0] += 1
        except ProcessLookupError:
            pass

    def blast() -> None:
        while stack.server is None and not done.is_set():
            time.sleep(0.0002)
        seen: set[int] = set()
        while not done.is_set() and stack.server is not None:
            parent = stack.server.pid
            if _catches_sighup(parent):
                hup(parent)
            # Workers only: before binding, children are import-time helpers (ldconfig).
            for child in _children(parent) if _bound(parent) else ():
                if child not in seen:
                    seen.add(child)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGSTOP)
                        hup(child)
                        os.kill(child, signal.SIGCONT)
                hup(child)
            time.sleep(0.0002)

    blaster = threading.Thread(target=blast)
    blaster.start()
    try:
        try:
            server = stack.start_server()
            wait_for("both workers", lambda: server.text().count("listening on port") >= 2)
        finally:
            done.set()
            blaster.join()
        assert sent[0] > 0
        assert server.alive(), server.text()
        pids = _children(server.pid)
        assert len(pids) == 2, server.text()
        assert sum(_knock(stack, stack.addrs(False)[1]) for _ in range(3)) == 3
        assert "exited with status" not in server.text()
        assert "Traceback" not in server.text()
    finally:
        stack.close()
