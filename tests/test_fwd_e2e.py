"""fastknockfwd end to end: the real daemon in a server namespace, the real kernel, real traffic.

Each test builds two namespaces joined by a veth pair (tests/netns.py), loads letmein's
compat nftables.conf plus MYCHAIN-* chains in the server namespace, starts
``python -m fastknock.fwd`` there and talks to it over its Unix socket as fastknockd
would. Probes connect from the client namespace, from its first address (the knocker)
and its second (another client). Lease timeouts are 2 s. Skips only without root/nft/ip,
fails instead when $CI is set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from fastknock import ipc
from fastknock.conf.config import config_checksum
from fastknock.ipc import FwOp, FwStatus
from fastknock.knockd import fwdlink
from tests import fwd_client, netns
from tests.e2e_support import FWD_USER

pytestmark = pytest.mark.e2e

USER = 0x12345678
USER2 = 0x00000002
CONF = """\
[GENERAL]
port = 5800 / tcp, udp
control-timeout = 2

[NFTABLES]
exe = nft
family = inet
table = filter
chain-input = LETMEIN-INPUT
chain-forward = LETMEIN-FORWARD
chain-output = LETMEIN-OUTPUT
timeout = {timeout}
max-nr-rules = {max_nr_rules}

[KEYS]
12345678 = 80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D
00000002 = 1111111111111111111111111111111111111111111111111111111111111111

[RESOURCES]
00000042 = port: 42
00000053 = port: 53 / udp
00000044 = port: 44 / tcp,udp / users: 12345678
00000045 = port: 45 / timeout: 600
00005800 = port: 5800
aabbccdd = jump /
           input: MYCHAIN-INPUT / forward: MYCHAIN-FORWARD / output: MYCHAIN-OUTPUT /
           input-match: saddr / forward-match: saddr / output-match: saddr /
           users: 12345678 /
           timeout: 2
aabbccde = jump / input: MYCHAIN-INPUT / output: MYCHAIN-OUTPUT
"""
MYCHAIN_RULES = netns.MYCHAINS + "add rule inet filter MYCHAIN-INPUT tcp dport 43 accept\n"


def eventually(pred: Callable[[], bool], within: float = 10.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


class Fwd:
    """One fastknockfwd process in the server namespace, driven like fastknockd drives it."""

    def __init__(self, pair: netns.Pair, workdir: str, **conf: object) -> None:
        self.pair = pair
        self.dir = workdir
        self.conf_path = os.path.join(workdir, "fastknockd.conf")
        values = {"timeout": 2, "max_nr_rules": 100, **conf}
        text = CONF.format(**values)
        with open(self.conf_path, "w") as f:
            f.write(text)
        self.checksum = config_checksum(text.encode())
        self.rundir = os.path.join(workdir, "run")
        self.path = ipc.socket_path(self.rundir)
        self.log_path = os.path.join(workdir, "fwd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, test_mode: bool = True) -> Fwd:
        argv = [sys.executable, "-m", "fastknock.fwd", "-c", self.conf_path, "--rundir"]
        argv += [self.rundir, "--no-systemd", "-v", "--user", FWD_USER, *extra]
        if test_mode:
            argv.append("--test-mode")
        with open(self.log_path, "a") as log:
            self.proc = netns.popen(self.pair.server, argv, stderr=log, cwd=os.getcwd())
        pidfile = ipc.pid_path(self.rundir)

        def ready() -> bool:  # the PID file is written once the socket listens
            assert self.proc is not None
            try:
                with open(pidfile) as f:
                    return f.read().strip() == str(self.proc.pid)
            except OSError:
                return self.proc.poll() is not None

        ok = eventually(ready)
        assert ok and self.proc.poll() is None, f"fastknockfwd did not start:\n{self.log()}"
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def ask(
        self, op: FwOp, res: int, addr: str, user: int = USER, checksum: bytes | None = None
    ) -> FwStatus:
        req = ipc.FwRequest(op, user, res, ipaddress.ip_address(addr), checksum or self.checksum)
        return fwd_client.request_sync(self.path, req, 10.0)

    def install(self, res: int, addr: str, **kw: object) -> FwStatus:
        return self.ask(FwOp.INSTALL, res, addr, **kw)  # type: ignore[arg-type]

    def revoke(self, res: int, addr: str) -> FwStatus:
        return self.ask(FwOp.REVOKE, res, addr)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def stats(self) -> dict[str, int]:
        line = [x for x in self.log().splitlines() if "stats: requests=" in x][-1]
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}

    def list(self) -> str:
        argv = [sys.executable, "-m", "fastknock.fwd", "-c", self.conf_path, "--list"]
        proc = netns.run(self.pair.server, argv)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


class Env:
    def __init__(self, pair: netns.Pair, workdir: str) -> None:
        self.pair = pair
        self.dir = workdir
        self.fwds: list[Fwd] = []
        self.socks: list[socket.socket] = []

    def fwd(self, **conf: object) -> Fwd:
        fwd = Fwd(self.pair, self.dir, **conf)
        self.fwds.append(fwd)
        return fwd

    def listen(self, family: int, kind: int, port: int) -> socket.socket:
        sock = netns.socket_in(self.pair.server, family, kind)
        self.socks.append(sock)
        addr = self.pair.server_v4 if family == socket.AF_INET else self.pair.server_v6
        sock.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        return sock

    def tcp(self, src: str, port: int) -> bool:
        dst = self.pair.server_v6 if ":" in src else self.pair.server_v4
        return netns.tcp_connects(self.pair.client, src, dst, port)

    def udp(self, src: str, receiver: socket.socket, port: int) -> bool:
        dst = self.pair.server_v6 if ":" in src else self.pair.server_v4
        return netns.udp_delivers(self.pair.client, src, receiver, dst, port)

    def chain(self, name: str) -> str:
        return netns.nft(self.pair.server, "list", "chain", "inet", "filter", name)

    def set_size(self, name: str) -> int:
        out = netns.nft(self.pair.server, "-j", "list", "set", "inet", "filter", name)
        for item in json.loads(out)["nftables"]:
            if "set" in item:
                return len(item["set"].get("elem", []))
        raise AssertionError(out)


@pytest.fixture
def env() -> Iterator[Env]:
    netns.require()
    # A world-traversable work dir, so that unprivileged test peers can reach the socket.
    workdir = tempfile.mkdtemp(prefix="fk-fwd-")
    os.chmod(workdir, 0o755)
    e: Env | None = None
    try:
        with netns.veth_pair() as pair:
            netns.load_ruleset(pair.server, extra=MYCHAIN_RULES)
            e = Env(pair, workdir)
            try:
                yield e
            finally:
                for fwd in e.fwds:
                    if fwd.proc is not None and fwd.proc.poll() is None:
                        fwd.proc.kill()
                        fwd.proc.wait()
                for sock in e.socks:
                    sock.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("runner", ["libnftables", "nft-exe"])
def test_tcp_lease_opens_only_for_the_knocker_until_timeout_or_revoke(
    env: Env, runner: str
) -> None:
    env.listen(socket.AF_INET, socket.SOCK_STREAM, 42)
    me, other = env.pair.client_v4
    fwd = env.fwd().start(*(["--nft-exe"] if runner == "nft-exe" else []))
    assert f"(runner {runner}," in fwd.log()
    assert not env.tcp(me, 42)
    assert fwd.install(0x42, me) == FwStatus.ACK
    assert env.tcp(me, 42)
    assert not env.tcp(other, 42)
    assert eventually(lambda: not env.tcp(me, 42))  # 2 s timeout, expired by the kernel
    assert fwd.install(0x42, me) == FwStatus.ACK
    assert env.tcp(me, 42)
    assert fwd.revoke(0x42, me) == FwStatus.ACK
    assert not env.tcp(me, 42)
    assert fwd.revoke(0x42, me) == FwStatus.ACK  # revoking a missing lease is fine
    # The control port is open for everybody, as letmein does.
    assert "tcp dport 5800 accept" in env.chain("LETMEIN-INPUT")
    assert "udp dport 5800 accept" in env.chain("LETMEIN-INPUT")


def test_udp_lease(env: Env) -> None:
    rx = env.listen(socket.AF_INET, socket.SOCK_DGRAM, 53)
    me, other = env.pair.client_v4
    fwd = env.fwd().start()
    assert not env.udp(me, rx, 53)
    assert fwd.install(0x53, me) == FwStatus.ACK
    assert env.udp(me, rx, 53)
    assert not env.udp(other, rx, 53)
    assert eventually(lambda: not env.udp(me, rx, 53))
    assert fwd.install(0x53, me) == FwStatus.ACK
    assert env.udp(me, rx, 53)
    assert fwd.revoke(0x53, me) == FwStatus.ACK
    assert not env.udp(me, rx, 53)


def test_ipv6_leases(env: Env) -> None:
    env.listen(socket.AF_INET6, socket.SOCK_STREAM, 42)
    rx = env.listen(socket.AF_INET6, socket.SOCK_DGRAM, 44)
    env.listen(socket.AF_INET6, socket.SOCK_STREAM, 44)
    me, other = env.pair.client_v6
    fwd = env.fwd().start()
    assert not env.tcp(me, 42)
    assert fwd.install(0x42, me) == FwStatus.ACK
    assert env.tcp(me, 42) and not env.tcp(other, 42)
    assert fwd.install(0x44, me) == FwStatus.ACK  # tcp,udp
    assert env.tcp(me, 44) and env.udp(me, rx, 44)
    assert not env.tcp(other, 44) and not env.udp(other, rx, 44)
    assert eventually(lambda: not env.tcp(me, 42) and not env.udp(me, rx, 44))
    assert fwd.install(0x42, me) == FwStatus.ACK
    assert fwd.revoke(0x42, me) == FwStatus.ACK
    assert not env.tcp(me, 42)


def test_jump_resource_with_saddr_match(env: Env) -> None:
    env.listen(socket.AF_INET, socket.SOCK_STREAM, 43)  # accepted in MYCHAIN-INPUT
    me, other = env.pair.client_v4
    fwd = env.fwd().start()
    assert not env.tcp(me, 43)
    assert fwd.install(0xAABBCCDD, me) == FwStatus.ACK
    for hook in ("INPUT", "FORWARD", "OUTPUT"):
        assert f"ip saddr {me} jump MYCHAIN-{hook}" in env.chain(f"LETMEIN-{hook}")
    assert env.tcp(me, 43) and not env.tcp(other, 43)
    assert "jump input->MYCHAIN-INPUT" in fwd.list()
    # Expiry (2 s) is the daemon's job for jump leases: the rules go away.
    assert eventually(lambda: "jump" not in env.chain("LETMEIN-INPUT"))
    assert "jump" not in env.chain("LETMEIN-FORWARD") + env.chain("LETMEIN-OUTPUT")
    assert not env.tcp(me, 43)
    # A re-knock replaces the rule instead of adding a second one; revoke removes it.
    assert fwd.install(0xAABBCCDD, me) == FwStatus.ACK
    assert fwd.install(0xAABBCCDD, me) == FwStatus.ACK
    assert env.chain("LETMEIN-INPUT").count("jump MYCHAIN-INPUT") == 1
    assert fwd.revoke(0xAABBCCDD, me) == FwStatus.ACK
    assert "jump" not in env.chain("LETMEIN-INPUT")
    assert not env.tcp(me, 43)
    assert fwd.install(0xAABBCCDD, me, user=USER2) == FwStatus.USER_NOT_ALLOWED


def test_jump_resource_without_saddr_match(env: Env) -> None:
    env.listen(socket.AF_INET, socket.SOCK_STREAM, 43)
    me, other = env.pair.client_v4
    fwd = env.fwd().start()
    assert fwd.install(0xAABBCCDE, me) == FwStatus.ACK
    text = env.chain("LETMEIN-INPUT")
    assert re.search(r"^\s*jump MYCHAIN-INPUT comment", text, re.M), text
    assert re.search(r"^\s*jump MYCHAIN-OUTPUT comment", env.chain("LETMEIN-OUTPUT"), re.M)
    assert "jump" not in env.chain("LETMEIN-FORWARD")
    assert env.tcp(me, 43) and env.tcp(other, 43)  # not bound to the knocker's address
    assert fwd.revoke(0xAABBCCDE, me) == FwStatus.ACK
    assert "jump" not in env.chain("LETMEIN-INPUT") + env.chain("LETMEIN-OUTPUT")
    assert not env.tcp(me, 43) and not env.tcp(other, 43)


def test_max_nr_rules(env: Env) -> None:
    fwd = env.fwd(max_nr_rules=4).start()
    a, b = env.pair.client_v4
    c, d = env.pair.client_v6
    assert fwd.install(0x44, a) == FwStatus.ACK  # tcp,udp: counts 2
    assert fwd.install(0x42, b) == FwStatus.ACK
    assert fwd.install(0x42, c) == FwStatus.ACK
    assert fwd.install(0x42, d) == FwStatus.LIMIT
    assert fwd.install(0x42, c) == FwStatus.ACK  # a refresh needs no room
    assert fwd.revoke(0x42, c) == FwStatus.ACK
    assert fwd.install(0x42, d) == FwStatus.ACK  # room again after a revoke
    assert fwd.install(0x42, c) == FwStatus.LIMIT
    # After expiry (2 s) every lease is gone and requests are accepted again. Wait for the
    # kernel to have expired all of them: they were installed some ms apart, so a request
    # that finds room as soon as the first ones expired would leave the cap arithmetic
    # below to chance.
    sets = [f"fastknock_{proto}{v}" for proto in ("tcp", "udp") for v in (4, 6)]
    assert eventually(lambda: sum(env.set_size(name) for name in sets) == 0)
    assert fwd.install(0x44, c) == FwStatus.ACK
    assert fwd.install(0x42, a) == FwStatus.ACK
    assert fwd.install(0x42, b) == FwStatus.ACK
    assert fwd.install(0x42, d) == FwStatus.LIMIT


def test_restart_keeps_leases_and_static_rules(env: Env) -> None:
    env.listen(socket.AF_INET, socket.SOCK_STREAM, 42)
    env.listen(socket.AF_INET, socket.SOCK_STREAM, 43)
    me, _ = env.pair.client_v4
    first = env.fwd(timeout=6).start()
    installed = time.monotonic()
    assert first.install(0x42, me) == FwStatus.ACK
    assert first.install(0xAABBCCDE, me) == FwStatus.ACK  # jump, 6 s, daemon-expired
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = env.fwd(timeout=6).start()
    assert "3 live lease(s) in the kernel" in second.log()  # port + input/output jumps
    assert env.tcp(me, 42) and env.tcp(me, 43)
    static = env.chain("LETMEIN-INPUT").count('comment "fastknock:')
    assert static == 2 + 4 + 1  # control tcp/udp, four set rules, one jump lease
    assert eventually(lambda: not env.tcp(me, 42), within=15)
    assert time.monotonic() - installed >= 5.0  # not early: the kernel kept the timeout
    assert eventually(lambda: not env.tcp(me, 43), within=15)
    assert "jump" not in env.chain("LETMEIN-INPUT")
    # A clean stop leaves leases in place and removes socket and PID file.
    assert second.install(0x42, me) == FwStatus.ACK
    assert second.stop() == 0
    assert not os.listdir(os.path.join(second.rundir, "fastknockfwd"))
    assert env.tcp(me, 42)


def test_thousand_concurrent_installs_are_batched(env: Env) -> None:
    fwd = env.fwd(max_nr_rules=5000).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    addrs = [f"10.78.{i // 250}.{i % 250 + 1}" for i in range(1000)]

    async def knock_all() -> list[FwStatus]:
        async def one(addr: str) -> FwStatus:
            req = ipc.FwRequest(FwOp.INSTALL, USER, 0x45, ipaddress.ip_address(addr), fwd.checksum)
            return await fwdlink.request(fwd.path, req, 60.0)

        return await asyncio.gather(*(one(a) for a in addrs))

    try:
        results = asyncio.run(knock_all())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert results == [FwStatus.ACK] * 1000
    assert env.set_size("fastknock_tcp4") == 1000
    assert fwd.stop() == 0
    stats = fwd.stats()
    assert stats["requests"] == 1000 and stats["acks"] == 1000
    print("batching stats:", stats)
    assert stats["transactions"] * 10 <= 1000, stats  # far fewer transactions than requests
    assert "1000 lease(s)" in fwd.list()


def _raw(path: str, data: bytes, shut: bool = False) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass  # the daemon may answer (and close) before reading
        if shut:
            s.shutdown(socket.SHUT_WR)
        return s.recv(64)


def _as_user(uid: int, gid: int, path: str, data: bytes) -> bytes:
    """Send ``data`` from a forked child running as uid/gid; return the reply bytes."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec, so no need to reach the interpreter as that user
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(wfd, b"R" + _raw(path, data))
        except BaseException as exc:
            os.write(wfd, b"E" + repr(exc).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        out = r.read()
    os.waitpid(pid, 0)
    assert out[:1] == b"R", out
    return out[1:]


def test_bad_requests_are_refused_and_daemon_keeps_serving(env: Env) -> None:
    fwd = env.fwd(timeout=600).start()
    me = env.pair.client_v4[0]
    good = ipc.encode_request(
        ipc.FwRequest(FwOp.INSTALL, USER, 0x42, ipaddress.ip_address(me), fwd.checksum)
    )
    assert fwd.install(0x42, me, checksum=bytes(32)) == FwStatus.BAD_CHECKSUM
    for bad in ("0.0.0.0", "255.255.255.255", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"):
        assert fwd.install(0x42, bad) == FwStatus.BAD_ADDRESS
    assert fwd.install(0x99, me) == FwStatus.UNKNOWN_RESOURCE
    assert fwd.install(0x42, me, user=0xDEADBEEF) == FwStatus.USER_NOT_ALLOWED
    assert fwd.install(0x44, me, user=USER2) == FwStatus.USER_NOT_ALLOWED
    assert fwd.install(0x5800, me) == FwStatus.BAD_PORT
    # Garbage of the right size gets MALFORMED; short or silent peers are just dropped.
    assert ipc.decode_reply(_raw(fwd.path, os.urandom(ipc.REQUEST_SIZE))) == FwStatus.MALFORMED
    assert _raw(fwd.path, good[:10], shut=True) == b""
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(fwd.path)
    slow.sendall(good[:30])
    assert fwd.install(0x42, me) == FwStatus.ACK  # served while the slow peer hangs
    slow.settimeout(10)
    assert slow.recv(64) == b""  # dropped after control-timeout
    slow.close()
    # A peer with another uid (but group access to the socket) is refused. The socket's
    # group is the server account's (or root's, in test mode without that account).
    reply = _as_user(pwd.getpwnam("nobody").pw_uid, os.stat(fwd.path).st_gid, fwd.path, good)
    assert ipc.decode_reply(reply) == FwStatus.NOT_PERMITTED
    # IPv4-mapped IPv6 is an IPv4 client.
    assert fwd.install(0x42, "::ffff:" + env.pair.client_v4[1]) == FwStatus.ACK
    assert env.set_size("fastknock_tcp4") == 2 and env.set_size("fastknock_tcp6") == 0
    assert fwd.proc is not None and fwd.proc.poll() is None
    assert fwd.install(0x42, me) == FwStatus.ACK
    log = fwd.log()
    assert "BAD_CHECKSUM" in log and "refused peer" in log and "malformed request" in log


def test_server_account_checked_without_test_mode(env: Env) -> None:
    fwd = env.fwd().start("--server-user", "nobody", test_mode=False)
    me = env.pair.client_v4[0]
    assert fwd.install(0x42, me) == FwStatus.NOT_PERMITTED  # root is not the server account
    sock_dir = os.path.dirname(fwd.path)
    st_dir, st_sock = os.stat(sock_dir), os.stat(fwd.path)
    assert (st_dir.st_mode & 0o777, st_sock.st_mode & 0o777) == (0o750, 0o660)
    nobody = pwd.getpwnam("nobody")
    assert st_dir.st_gid == st_sock.st_gid == nobody.pw_gid
    assert st_dir.st_uid == st_sock.st_uid == pwd.getpwnam(FWD_USER).pw_uid  # its own account
    req = ipc.FwRequest(FwOp.INSTALL, USER, 0x42, ipaddress.ip_address(me), fwd.checksum)
    reply = _as_user(nobody.pw_uid, nobody.pw_gid, fwd.path, ipc.encode_request(req))
    assert ipc.decode_reply(reply) == FwStatus.ACK
    with open(ipc.pid_path(fwd.rundir)) as f:
        assert int(f.read()) == fwd.proc.pid  # type: ignore[union-attr]


def test_bad_config_and_missing_chain_exit_nonzero(env: Env) -> None:
    argv = [sys.executable, "-m", "fastknock.fwd", "--rundir", env.dir + "/run", "--test-mode"]
    bad = os.path.join(env.dir, "bad.conf")
    with open(bad, "w") as f:
        f.write("[NFTABLES]\nchain-input = LETMEIN-INPUT\nmax-nr-rules = many\n")
    proc = netns.run(env.pair.server, [*argv, "-c", bad])
    assert proc.returncode == 2 and "bad.conf:3" in proc.stderr
    fwd = env.fwd()
    with open(fwd.conf_path) as f:
        text = f.read().replace("chain-forward = LETMEIN-FORWARD", "chain-forward = NOPE")
    with open(bad, "w") as f:
        f.write(text)
    proc = netns.run(env.pair.server, [*argv, "-c", bad])
    assert proc.returncode == 1 and "NOPE" in proc.stderr and "missing" in proc.stderr


def test_second_instance_refused_first_keeps_serving(env: Env) -> None:
    first = env.fwd().start()
    argv = [sys.executable, "-m", "fastknock.fwd", "-c", first.conf_path, "--test-mode"]
    proc = netns.run(env.pair.server, [*argv, "--rundir", first.rundir, "--no-systemd"])
    assert proc.returncode == 1 and "already running" in proc.stderr
    assert first.install(0x42, env.pair.client_v4[0]) == FwStatus.ACK
