"""Hardening on the real kernel: the privilege drop and seccomp filter read back from /proc,
socket activation by ``systemd-socket-activate`` (TCP and UDP), sd_notify, and SIGHUP reload
of both daemons. (The knock/revoke matrix under ``seccomp = kill`` is in test_server_e2e.py.)
Namespaces, processes and files come from ``Stack`` (tests/e2e_support.py) and are removed
afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastknock.osutil import privs
from tests import netns
from tests.e2e_peers import CHALLENGE, GOAWAY, KNOCK, RESPONSE, signed, unpack
from tests.e2e_support import (
    FWD_USER,
    KEY1,
    REPO,
    SERVER_USER,
    USER1,
    Daemon,
    Stack,
    _env,
    client_config,
    fwd_only_stack,
    jump_res,
    port_res,
    server_config,
    wait_for,
)

pytestmark = pytest.mark.e2e

R_TCP = port_res(0x301, 2601)
R_UDP_CTL = port_res(0x302, 2602)
R_JUMP = jump_res(0x303, "HARD-JUMP", 2603)
R_NEW = port_res(0x304, 2604)
RESOURCES = [R_TCP, R_UDP_CTL, R_JUMP, R_NEW]
KILL = ("--seccomp", "kill")


def knock_ok(stack: Stack, command: str, host: str, *args: str) -> None:
    k = stack.knock(command, host, *args)
    assert k.code == 0, f"fastknock {command} failed:\n{k.err}\n--- daemons:\n{stack.all_logs()}"


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.fixture(scope="module")
def killstack() -> Iterator[Stack]:
    netns.require()
    stack = Stack("kill", RESOURCES, "basic-auth", 1.0, server_args=KILL, fwd_args=KILL)
    try:
        yield stack
    finally:
        stack.close()


def test_privileges_after_start_up(killstack: Stack) -> None:
    """fastknockd: the unprivileged account, no groups, no capabilities, no_new_privs, a
    seccomp filter. fastknockfwd: its own account (FWD_USER), CAP_NET_ADMIN only (also
    ambient, for the nft executable), and filtered (more in test_runfiles_e2e.py)."""
    assert killstack.server is not None and killstack.fwd is not None
    uid, gid = privs.lookup(SERVER_USER)
    st = status(killstack.server.pid)
    assert st["Uid"].split() == [str(uid)] * 4
    assert st["Gid"].split() == [str(gid)] * 4
    assert st["Groups"].strip() == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(st[cap], 16) == 0, cap
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    fst = status(killstack.fwd.pid)
    assert fst["Uid"].split() == [str(privs.lookup(FWD_USER)[0])] * 4
    for cap in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fst[cap], 16) == 1 << privs.CAP_NET_ADMIN, cap
    assert fst["NoNewPrivs"] == "1" and fst["Seccomp"] == "2"


def test_missing_account_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "fastknockd.conf"
    conf.write_text(server_config([R_TCP], "basic-auth"))
    conf.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "fastknock.server", "-c", str(conf), "--rundir", str(tmp_path),
         "--user", "fastknock-no-such-account", "--no-systemd"],
        capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "useradd --system" in proc.stderr and "Traceback" not in proc.stderr


# -- reload ------------------------------------------------------------------------------------


def _reload(stack: Stack, daemon: Daemon | None, marker: str, before: int) -> None:
    assert daemon is not None
    daemon.send_signal(signal.SIGHUP)
    wait_for(f"{marker} in {daemon.text()[-200:]}", lambda: daemon.text().count(marker) > before)


def test_reload_good_then_bad_config(killstack: Stack) -> None:
    """A new resource becomes knockable after SIGHUP to fastknockfwd, then fastknockd (that
    order: the firewall daemon must know the new config before requests carry its checksum);
    a broken config is refused by both while the old keeps serving; leases survive both."""
    stack = killstack
    server, me, _ = stack.addrs(False)
    old_conf = stack.server_conf.read_text()
    without_new = server_config([R_TCP, R_UDP_CTL, R_JUMP], "basic-auth", 1.0)
    try:
        for text in (without_new,):
            stack.server_conf.write_text(text)
            _reload(stack, stack.fwd, "reloaded", stack.fwd.text().count("reloaded"))  # type: ignore[union-attr]
            _reload(stack, stack.server, "reloaded", stack.server_log().count("reloaded"))
        knock_ok(stack, "knock", server, "-r", f"{R_TCP.id:08X}", "-4")  # a live lease
        assert stack.knock("knock", server, "-r", f"{R_NEW.id:08X}", "-4", "-T").code != 0

        stack.server_conf.write_text(old_conf)  # R_NEW is back
        _reload(stack, stack.fwd, "reloaded", stack.fwd.text().count("reloaded"))  # type: ignore[union-attr]
        _reload(stack, stack.server, "reloaded", stack.server_log().count("reloaded"))
        knock_ok(stack, "knock", server, "-r", f"{R_NEW.id:08X}", "-4")
        assert stack.connects(me, server, R_NEW.probe)
        assert stack.connects(me, server, R_TCP.probe)  # the earlier lease survived

        stack.server_conf.write_text(old_conf.replace("[KEYS]", "[KEYS]\nnot a key line"))
        _reload(stack, stack.fwd, "reload failed", 0)
        _reload(stack, stack.server, "reload failed", 0)
        knock_ok(stack, "knock", server, "-r", f"{R_NEW.id:08X}", "-4")  # old config serves
        assert stack.connects(me, server, R_TCP.probe) and stack.connects(me, server, R_NEW.probe)
        assert stack.server is not None and stack.server.alive()
        assert "Traceback" not in stack.all_logs()
    finally:
        stack.server_conf.write_text(old_conf)


# -- systemd -----------------------------------------------------------------------------------


@pytest.fixture
def bare() -> Iterator[Stack]:
    """fastknockfwd only: each test starts fastknockd its own way."""
    netns.require()
    if shutil.which("systemd-socket-activate") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate missing (apt package systemd)")
        pytest.skip("systemd-socket-activate missing (apt package systemd)")
    stack = Stack("sd", [R_TCP], "basic-auth", 1.0, start_server=False)
    try:
        yield stack
    finally:
        stack.close()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_socket_activation(bare: Stack, transport: str) -> None:
    """systemd-socket-activate binds the control port and execs fastknockd on the first
    connection/datagram; fastknockd serves on the passed socket (binding its own would fail:
    the port is taken) and reports READY=1 and STOPPING=1 over $NOTIFY_SOCKET."""
    bare.server_conf.write_text(
        server_config([R_TCP], "basic-auth", 2.0, port_spec=f"5800 / {transport}")
    )
    _reload(bare, bare.fwd, "reloaded", 0)  # the firewall daemon must share the checksum
    client_conf = bare.work / f"client-{transport}.conf"
    client_conf.write_text(client_config([R_TCP], timeout=5.0))
    notify_path = bare.work / f"notify-{transport}.sock"  # work/ is 0755: reachable by nobody
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    os.chmod(notify_path, 0o777)  # noqa: S103 -- the daemon notifies after dropping root
    notify.settimeout(15)
    env = dict(_env(), NOTIFY_SOCKET=str(notify_path))
    argv = [
        "systemd-socket-activate",
        "-l",
        "5800",
        *(["--datagram"] if transport == "udp" else []),
    ]
    argv += ["-E", f"PYTHONPATH={env['PYTHONPATH']}", "-E", f"NOTIFY_SOCKET={notify_path}"]
    argv += [sys.executable, "-m", "fastknock.server", "-c", str(bare.server_conf), "--rundir",
             str(bare.rundir), "--user", SERVER_USER, "-v"]  # fmt: skip
    log = open(bare.work / f"activate-{transport}.log", "wb")  # noqa: SIM115
    proc = netns.popen(bare.pair.server, argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon("activated", proc, bare.work / f"activate-{transport}.log", log)
    try:
        wait_for("systemd-socket-activate", lambda: "Listening on" in daemon.text())
        server, me, _ = bare.addrs(False)
        proto = "-T" if transport == "tcp" else "-U"
        k = bare.knock("knock", server, str(R_TCP.probe), "-4", proto, config=client_conf)
        assert k.code == 0, f"{k.err}\n{daemon.text()}"
        assert bare.connects(me, server, R_TCP.probe)
        assert notify.recv(100) == b"READY=1"
        assert "listening on port 5800" in daemon.text()
        assert daemon.stop() == 0
        assert notify.recv(100) == b"STOPPING=1"
        assert "Traceback" not in daemon.text()
    finally:
        daemon.stop()
        notify.close()


# A minimal socket-activation launcher (what systemd does): bind the listed sockets, put
# them at fd 3.., set LISTEN_FDS/LISTEN_PID and exec fastknockd in the same process. Unlike
# systemd-socket-activate it can pass TCP and UDP at once, as fastknockd.socket does.
LAUNCHER = r"""
import fcntl, os, socket, sys
kinds, port, argv = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3:]
high = []
for kind in kinds:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    if kind == "tcp":
        s.listen(16)
    fd = s.detach()
    high.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 100))
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "fastknock.server", *argv])
"""


def _activate(stack: Stack, kinds: str, port_spec: str, tag: str) -> Daemon:
    stack.server_conf.write_text(server_config([R_TCP], "basic-auth", 2.0, port_spec=port_spec))
    _reload(stack, stack.fwd, "reloaded", stack.fwd.text().count("reloaded"))  # type: ignore[union-attr]
    argv = [sys.executable, "-c", LAUNCHER, kinds, "5800", "-c", str(stack.server_conf),
            "--rundir", str(stack.rundir), "--user", SERVER_USER, "-v"]  # fmt: skip
    log_path = stack.work / f"launch-{tag}.log"
    log = open(log_path, "wb")  # noqa: SIM115 -- closed by Daemon.stop
    proc = netns.popen(stack.pair.server, argv, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                       cwd=str(REPO))  # fmt: skip
    return Daemon(f"launch-{tag}", proc, log_path, log)


@pytest.fixture
def launchable() -> Iterator[Stack]:
    with fwd_only_stack("act", [R_TCP]) as stack:
        yield stack


def test_activation_serves_only_the_configured_transport(launchable: Stack) -> None:
    """The config says ``5800 / udp``; the activator passes TCP *and* UDP on 5800 (as the
    old fastknockd.socket did): the TCP socket is closed with a warning (a TCP connect on
    loopback is refused: no CHALLENGE for a UDP-only server), UDP serves (the control)."""
    stack = launchable
    daemon = _activate(stack, "tcp,udp", "5800 / udp", "stealth")
    try:
        wait_for("fastknockd", lambda: "listening on port 5800/udp" in daemon.text())
        ns = stack.pair.server
        assert not netns.tcp_connects(ns, "127.0.0.1", "127.0.0.1", 5800)
        assert "tcp socket on port 5800 that the config does not list" in daemon.text()
        server, me, _ = stack.addrs(False)
        client_conf = stack.work / "client-udp.conf"
        client_conf.write_text(client_config([R_TCP], timeout=5.0))
        client_conf.chmod(0o600)
        k = stack.knock("knock", server, str(R_TCP.probe), "-4", "-U", config=client_conf)
        assert k.code == 0, f"{k.err}\n{daemon.text()}"
        assert stack.connects(me, server, R_TCP.probe)
    finally:
        daemon.stop()


def test_activation_without_a_configured_transport_refuses_to_start(launchable: Stack) -> None:
    """The config says ``5800 / udp, tcp``; the activator passes UDP only: fastknockd exits
    with a clear error instead of serving half of what the config lists."""
    daemon = _activate(launchable, "udp", "5800 / udp, tcp", "missing")
    try:
        rc = daemon.proc.wait(timeout=60)  # a hang guard, not a measurement
        assert rc == 1, daemon.text()
        assert "the config lists 5800/tcp but systemd passed no such socket" in daemon.text()
        assert "Traceback" not in daemon.text()
    finally:
        daemon.stop()


# -- late firewall changes ---------------------------------------------------------------------

R_LATE = port_res(0x305, 2605)


@pytest.fixture
def latestack() -> Iterator[Stack]:
    netns.require()
    stack = Stack("late", [R_TCP, R_LATE], "basic-auth", 1.0, server_args=["-N", "16"])
    try:
        yield stack
    finally:
        stack.close()


def test_stalled_fwd_never_applies_what_the_client_was_told_failed(latestack: Stack) -> None:
    """fastknockfwd stopped (SIGSTOP) while 20 knocks (two source addresses) wait for it:
    fastknockd gives up after its control timeout and answers GOAWAY; after SIGCONT the
    firewall daemon reads the 20 queued requests, past their deadline: EXPIRED, no lease.
    The control: a knock before the stall opens its port."""
    stack = latestack
    assert stack.fwd is not None
    server, me, other = stack.addrs(False)
    knock_ok(stack, "knock", server, str(R_TCP.probe), "-4")  # control
    assert stack.connects(me, server, R_TCP.probe)
    peers = [stack.udp(src) for src in [me] * 10 + [other] * 10]
    stack.fwd.send_signal(signal.SIGSTOP)
    try:
        for p in peers:
            p.send(signed(KEY1, KNOCK, USER1, R_LATE.id))
        challenges = [p.recv(10.0) for p in peers]
        assert all(c is not None and unpack(c).op == CHALLENGE for c in challenges)
        for p, c in zip(peers, challenges, strict=True):
            assert c is not None
            p.send(signed(KEY1, RESPONSE, USER1, R_LATE.id, unpack(c).auth))
        replies = [p.recv(15.0) for p in peers]  # fastknockd's control timeout is 1 s
        assert [None if r is None else unpack(r).op for r in replies] == [GOAWAY] * 20
    finally:
        stack.fwd.send_signal(signal.SIGCONT)
        for p in peers:
            p.close()
    fwd = stack.fwd
    tag = f"resource={R_LATE.id:08X}"
    wait_for("fwd to read the 20 requests", lambda: fwd.text().count(tag) >= 20)
    lines = [line for line in fwd.text().splitlines() if tag in line]
    assert all(line.endswith(": EXPIRED") for line in lines), lines
    assert not stack.connects(me, server, R_LATE.probe)
    assert not stack.connects(other, server, R_LATE.probe)
    assert stack.connects(me, server, R_TCP.probe)  # the earlier lease is untouched
