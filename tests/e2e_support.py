"""Support for the end-to-end tests of fastknockd (tests/test_server_e2e.py).

- An *independent* codec of PROTOCOL.md's message (``pack``/``unpack``/``sign``, with
  ``hmac`` + ``hashlib`` only), so the tests judge the daemons with an oracle that shares no
  code with them.
- ``Stack``: one veth namespace pair (``tests.netns``) with letmein's example ruleset, TCP
  listeners on the protected ports, the real ``fastknockfwd`` and ``fastknockd`` as
  subprocesses (PIDs kept; only those are ever signalled), and the real ``fastknock`` client.
- ``UdpPeer``/``TcpPeer``: raw control-port clients in the client namespace, bound to a
  chosen source address, that record every byte the server sends back.
- ``Sniffer``: an AF_PACKET socket on the server's veth that captures control datagrams.

Nothing here touches the host's network or ruleset: all sockets, rules and processes live in
the namespaces the ``Stack`` creates, and ``Stack.close`` removes them, also after failures.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pwd
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fastknock import ipc
from tests import netns

REPO = Path(__file__).resolve().parent.parent

# -- the oracle codec (PROTOCOL.md "Message" and "Authentication") ---------------------------

MAGIC = 0x3B1BB719
MSG_SIZE = 56
KNOCK, CHALLENGE, RESPONSE, COMEIN, GOAWAY, REVOKE = range(6)
OP_NAMES = {0: "KNOCK", 1: "CHALLENGE", 2: "RESPONSE", 3: "COMEIN", 4: "GOAWAY", 5: "REVOKE"}
ZERO = bytes(32)
UNKNOWN_ID = 0xFFFFFFFF
_HEAD = struct.Struct(">IIII")


class Msg(NamedTuple):
    magic: int
    op: int
    user: int
    resource: int
    salt: bytes
    auth: bytes


def sign(key: bytes, op: int, user: int, resource: int, salt: bytes, token: bytes = ZERO) -> bytes:
    data = struct.pack(">III", op, user, resource) + salt + token
    return hmac.new(key, data, hashlib.sha3_256).digest()


def pack(
    op: int,
    user: int,
    resource: int,
    salt: bytes | None = None,
    auth: bytes = ZERO,
    magic: int = MAGIC,
) -> bytes:
    salt = secrets.token_bytes(8) if salt is None else salt
    return _HEAD.pack(magic, op, user, resource) + salt + auth


def signed(key: bytes, op: int, user: int, resource: int, token: bytes = ZERO) -> bytes:
    """A message with a fresh salt and a valid AUTH (over ``token``) under ``key``."""
    salt = secrets.token_bytes(8)
    return pack(op, user, resource, salt, sign(key, op, user, resource, salt, token))


def unpack(data: bytes) -> Msg:
    assert len(data) == MSG_SIZE, f"a {len(data)}-byte message"
    magic, op, user, resource = _HEAD.unpack_from(data)
    return Msg(magic, op, user, resource, data[16:24], data[24:56])


def op_of(data: bytes) -> str:
    if len(data) != MSG_SIZE:
        return f"<{len(data)} bytes>"
    m = unpack(data)
    if m.magic != MAGIC:
        return "<bad magic>"
    return OP_NAMES.get(m.op, f"<op {m.op}>")


def flip(data: bytes, offset: int) -> bytes:
    """``data`` with one bit flipped at byte ``offset``."""
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


# -- raw control-port peers ------------------------------------------------------------------


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class UdpPeer:
    """An unconnected UDP socket in ``ns`` bound to ``src``: sees every datagram sent to it."""

    def __init__(self, ns: str, src: str, dst: str, port: int, sport: int = 0) -> None:
        self.dst = (dst, port)
        self.sock = netns.socket_in(ns, _family(dst), socket.SOCK_DGRAM)
        self.sock.bind((src, sport))
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.dst)

    def recv(self, timeout: float) -> bytes | None:
        """The next datagram within ``timeout`` seconds (an upper bound), else None."""
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(4096)
        except TimeoutError:
            return None
        self.received.append(data)
        return data

    def drain(self, wait: float) -> list[bytes]:
        """Everything that arrives within ``wait`` seconds from now."""
        end = time.monotonic() + wait
        got: list[bytes] = []
        while (left := end - time.monotonic()) > 0:
            data = self.recv(left)
            if data is not None:
                got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


class TcpPeer:
    """A TCP control connection from ``src`` in ``ns``."""

    def __init__(self, ns: str, src: str, dst: str, port: int, timeout: float = 5.0) -> None:
        self.sock = netns.socket_in(ns, _family(dst), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((src, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((dst, port))
        self.buf = b""
        self.eof = False
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout (``deadline`` is an upper bound) or EOF."""
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(4096)
        except TimeoutError:
            return False
        except ConnectionError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def recv(self, timeout: float) -> bytes | None:
        """The next 56-byte message within ``timeout``, else None (timeout or EOF)."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < MSG_SIZE:
            if not self._fill(deadline):
                return None
        data, self.buf = self.buf[:MSG_SIZE], self.buf[MSG_SIZE:]
        self.received.append(data)
        return data

    def drain(self, wait: float) -> list[bytes]:
        """Every message until the server closes the connection (or ``wait`` runs out)."""
        got: list[bytes] = []
        deadline = time.monotonic() + wait
        while (data := self.recv(max(deadline - time.monotonic(), 0))) is not None:
            got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


Peer = UdpPeer | TcpPeer


def peer(ns: str, tcp: bool, src: str, dst: str, port: int) -> Peer:
    return TcpPeer(ns, src, dst, port) if tcp else UdpPeer(ns, src, dst, port)


# -- protected services and packet capture ---------------------------------------------------


class Listeners:
    """TCP services in ``ns`` on ``ports`` (all addresses, both families); one thread
    accepts and closes every connection, so no backlog ever fills up."""

    def __init__(self, ns: str, ports: Sequence[int]) -> None:
        self.socks: list[socket.socket] = []
        self._sel = selectors.DefaultSelector()
        try:
            for port in ports:
                sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_STREAM)
                self.socks.append(sock)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::", port))
                sock.listen(64)
                sock.setblocking(False)
                self._sel.register(sock, selectors.EVENT_READ)
        except BaseException:
            self._close_socks()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(OSError):
                    conn, _ = sock.accept()
                    conn.close()

    def _close_socks(self) -> None:
        for sock in self.socks:
            sock.close()
        self._sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._close_socks()


def tcp_reachable(ns: str, src: str, dst: str, port: int, timeout: float = 5.0) -> bool:
    """Whether ``dst:port`` accepts a TCP connection from ``src`` (in ``ns``)."""
    return netns.tcp_connects(ns, src, dst, port, timeout)


ETH_P_ALL = 0x0003


class Sniffer:
    """Captures the UDP payloads sent to and from ``port`` on interface ``ifname`` of ``ns``
    (an AF_PACKET socket: sees the packets before the ruleset does)."""

    def __init__(self, ns: str, ifname: str, port: int) -> None:
        self.port = port
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.to_server: list[bytes] = []
        self.from_server: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _udp(self, pkt: bytes) -> tuple[int, int, bytes] | None:
        version = pkt[0] >> 4
        if version == 4:
            if pkt[9] != socket.IPPROTO_UDP:
                return None
            start = (pkt[0] & 0x0F) * 4
        elif version == 6:
            if pkt[6] != socket.IPPROTO_UDP:
                return None
            start = 40
        else:
            return None
        sport, dport, length = struct.unpack_from(">HHH", pkt, start)
        return sport, dport, pkt[start + 8 : start + length]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pkt = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            udp = self._udp(pkt)
            if udp is None:
                continue
            sport, dport, payload = udp
            if dport == self.port:
                self.to_server.append(payload)
            elif sport == self.port:
                self.from_server.append(payload)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# -- configs --------------------------------------------------------------------------------

USER1, USER2 = 0x00000001, 0x00000002
KEY1 = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
KEY2 = bytes.fromhex("1F2E3D4C5B6A79880F1E2D3C4B5A69788796A5B4C3D2E1F00112233445566778")
CONTROL_PORT = 5800
# fastknockd started as root drops to this account (it exists on every Debian system).
SERVER_USER = "nobody"
# fastknockfwd's own account in the tests (a real install creates "fastknockfwd"): the stock
# "nobody" with --test-mode, which also admits root peers. Its group is SERVER_USER's, so it
# re-reads the 0640 root:<that group> config on reload like an installed fastknockfwd.
FWD_USER = "nobody"


@dataclass(frozen=True)
class Res:
    """A resource of the test configs and the TCP port that shows whether it is open."""

    id: int
    spec: str  # the [RESOURCES] value
    probe: int  # TCP port that the resource opens (0: none)
    jump_chain: str = ""  # for jump resources: the chain with the accept rule


def port_res(rid: int, port: int, extra: str = "") -> Res:
    return Res(rid, f"port: {port}{extra}", port)


def jump_res(rid: int, chain: str, probe: int, extra: str = "") -> Res:
    return Res(rid, f"jump / input: {chain} / input-match: saddr{extra}", probe, chain)


def server_config(
    resources: Sequence[Res],
    policy: str,
    timeout: float = 1.0,
    lease_timeout: int = 600,
    port_spec: str = "5800 / udp, tcp",
    comment: str = "",
    nft_extra: str = "",
    extra: str = "",
) -> str:
    res = "\n".join(f"{r.id:08X} = {r.spec}" for r in resources)
    return (
        f"# fastknock e2e test config{comment}\n"
        f"[GENERAL]\nport = {port_spec}\ncontrol-timeout = {timeout}\n"
        f"control-error-policy = {policy}\n\n"
        "[NFTABLES]\nfamily = inet\ntable = filter\nchain-input = LETMEIN-INPUT\n"
        "chain-forward = LETMEIN-FORWARD\nchain-output = LETMEIN-OUTPUT\n"
        f"timeout = {lease_timeout}\n{nft_extra}\n"
        f"[KEYS]\n{USER1:08X} = {KEY1.hex().upper()}\n{USER2:08X} = {KEY2.hex().upper()}\n\n"
        f"[RESOURCES]\n{res}\n{extra}"
    )


def client_config(resources: Sequence[Res], timeout: float = 2.0, user: int = USER1) -> str:
    key = KEY1 if user == USER1 else KEY2
    res = "\n".join(f"{r.id:08X} = {r.spec}" for r in resources)
    return (
        f"[GENERAL]\nport = {CONTROL_PORT} / udp, tcp\ncontrol-timeout = {timeout}\n\n"
        f"[CLIENT]\ndefault-user = {user:08X}\n\n"
        f"[KEYS]\n{user:08X} = {key.hex().upper()}\n\n"
        f"[RESOURCES]\n{res}\n"
    )


def ruleset_extra(resources: Sequence[Res]) -> str:
    """MYCHAIN-* plus one chain per jump resource that accepts the resource's probe port."""
    lines = [netns.MYCHAINS]
    for r in resources:
        if r.jump_chain and r.jump_chain not in netns.MYCHAINS:
            lines.append(f"add chain inet filter {r.jump_chain}")
        if r.jump_chain:
            lines.append(f"add rule inet filter {r.jump_chain} tcp dport {r.probe} accept")
    return "\n".join(lines) + "\n"


# -- processes -------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env.pop("NOTIFY_SOCKET", None)
    return env


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``cond`` until true; ``timeout`` is an upper bound for a hung daemon."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal our own process (by PID) and reap it; SIGKILL only if it hangs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


@dataclass
class Knock:
    code: int
    err: str


class Stack:
    """A namespace pair with letmein's ruleset, protected listeners and both daemons."""

    def __init__(
        self,
        name: str,
        resources: Sequence[Res],
        policy: str = "basic-auth",
        timeout: float = 1.0,
        server_args: Sequence[str] = (),
        lease_timeout: int = 600,
        fwd_args: Sequence[str] = (),
        start_server: bool = True,
        verbose: bool = True,
        nft_extra: str = "",
        metrics: bool = False,
        port_spec: str = "5800 / udp, tcp",
        config_extra: str = "",
    ) -> None:
        """``verbose``: fastknockd with -v (a log line per reject; the batched receive path
        then hands every 56-byte datagram up to Python). ``nft_extra``: more [NFTABLES]
        lines, e.g. ``prefilter = off``. ``port_spec``: the server's ``port``. ``metrics``:
        fastknockd writes its counters every 0.1 s (read them with ``metrics()``).
        ``config_extra``: more sections at the end of the server config (e.g. [HOOKS])."""
        self.name = name
        self.verbose = verbose
        self.resources = list(resources)
        self.server_args = list(server_args)
        self.fwd_args = list(fwd_args)
        self._exit = contextlib.ExitStack()
        self.work = Path(self._exit.enter_context(_tempdir(f"fk-e2e-{name}-")))
        self.rundir = self.work / "run"
        self.rundir.mkdir()
        # fastknockd drops root to SERVER_USER: it must reach the firewall daemon's socket.
        os.chmod(self.work, 0o755)  # noqa: S103
        os.chmod(self.rundir, 0o755)  # noqa: S103
        self.server_conf = self.work / "fastknockd.conf"
        self.server_conf.write_text(
            server_config(
                resources,
                policy,
                timeout,
                lease_timeout,
                port_spec=port_spec,
                nft_extra=nft_extra,
                extra=config_extra,
            )  # fmt: skip
        )
        # As installed: root:<server group> 0640, so fastknockd can re-read it after the drop.
        self.server_conf.chmod(0o640)
        os.chown(self.server_conf, 0, pwd.getpwnam(SERVER_USER).pw_gid)
        self.client_conf = self.work / "fastknock.conf"
        self.client_conf.write_text(client_config(resources))
        self.client_conf.chmod(0o600)
        self.metrics_file: Path | None = None
        if metrics:
            (self.work / "metrics").mkdir()
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.work / "metrics", account.pw_uid, account.pw_gid)
            self.metrics_file = self.work / "metrics" / "fastknockd.prom"
            self.server_args += ["--metrics-file", str(self.metrics_file)]
            self.server_args += ["--metrics-interval", "0.1"]
        self.fwd: Daemon | None = None
        self.server: Daemon | None = None
        self._n = 0
        try:
            self.pair = self._exit.enter_context(netns.veth_pair())
            # Knocks from the fastknock client always leave from the first client address
            # of each family; the second one is "another machine" in the tests.
            _ip(
                "-n",
                self.pair.client,
                "route",
                "add",
                f"{self.pair.server_v4}/32",
                "dev",
                "fk1",
                "src",
                self.pair.client_v4[0],
            )
            _ip(
                "-n",
                self.pair.client,
                "-6",
                "route",
                "add",
                f"{self.pair.server_v6}/128",
                "dev",
                "fk1",
                "src",
                self.pair.client_v6[0],
            )
            netns.load_ruleset(self.pair.server, netns.COMPAT_RULESET, ruleset_extra(resources))
            ports = sorted({r.probe for r in resources if r.probe})
            self._exit.callback(Listeners(self.pair.server, ports).close)
            self._exit.callback(self._stop_all)
            self.start_fwd()
            if start_server:
                self.start_server()
        except BaseException:
            self.close()
            raise

    # -- lifecycle

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Daemon:
        self._n += 1
        log = self.work / f"{name}.{self._n}.log"
        f = open(log, "wb")  # noqa: SIM115 (closed by Daemon.stop)
        proc = netns.popen(
            self.pair.server,
            [sys.executable, *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**_env(), **(env or {})},
            cwd=str(REPO),
        )
        return Daemon(name, proc, log, f)

    def start_fwd(self, config: Path | None = None) -> Daemon:
        assert self.fwd is None or not self.fwd.alive()
        sock = self.rundir / "fastknockfwd" / "fastknockfwd.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self.fwd = self._spawn(
            "fwd",
            [
                "-m",
                "fastknock.fwd",
                "-c",
                str(config or self.server_conf),
                "--rundir",
                str(self.rundir),
                "--test-mode",
                "--server-user",
                SERVER_USER,
                "--user",
                FWD_USER,
                "--no-systemd",
                "-v",
                *self.fwd_args,
            ],
        )
        fwd = self.fwd
        pidfile = Path(ipc.pid_path(str(self.rundir)))

        def ready() -> bool:  # fastknockfwd writes its PID file last, after the privilege drop
            if not fwd.alive():
                raise AssertionError(f"fastknockfwd exited:\n{fwd.text()}")
            with contextlib.suppress(OSError):
                return pidfile.read_text().strip() == str(fwd.pid)
            return False

        wait_for("fastknockfwd", ready)
        assert sock.exists()
        assert f"dport {CONTROL_PORT}" in self.nft(
            "list", "chain", "inet", "filter", "LETMEIN-INPUT"
        )
        return fwd

    def start_server(self, extra: Sequence[str] = ()) -> Daemon:
        assert self.server is None or not self.server.alive()
        # Readiness is sd_notify's READY=1, sent once fastknockd serves with its privileges
        # dropped and its seccomp filter installed (a log line comes earlier). The socket is
        # closed after it: later notifications are refused, which the daemon ignores.
        notify_path = self.work / f"notify.{self._n + 1}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(notify_path))
            os.chmod(notify_path, 0o777)  # noqa: S103 -- fastknockd notifies after the drop
            notify.setblocking(False)
            argv = ["-m", "fastknock.server", "-c", str(self.server_conf), "--rundir",
                    str(self.rundir), "--user", SERVER_USER, *(["-v"] if self.verbose else []),
                    *self.server_args, *extra]  # fmt: skip
            self.server = self._spawn("fastknockd", argv, {"NOTIFY_SOCKET": str(notify_path)})
            server = self.server

            def ready() -> bool:
                if not server.alive():
                    raise AssertionError(f"fastknockd exited:\n{server.text()}")
                try:
                    return notify.recv(100) == b"READY=1"
                except BlockingIOError:
                    return False

            wait_for("fastknockd", ready)
        finally:
            notify.close()
            with contextlib.suppress(FileNotFoundError):
                notify_path.unlink()
        return server

    def _stop_all(self) -> None:
        for d in (self.server, self.fwd):
            if d is not None:
                d.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._exit.close()

    # -- helpers

    @property
    def ns(self) -> str:
        return self.pair.client

    def addrs(self, v6: bool) -> tuple[str, str, str]:
        """(server, knocker, other machine) addresses of one family."""
        p = self.pair
        if v6:
            return p.server_v6, p.client_v6[0], p.client_v6[1]
        return p.server_v4, p.client_v4[0], p.client_v4[1]

    def nft(self, *args: str, stdin: str | None = None) -> str:
        return netns.nft(self.pair.server, *args, stdin=stdin)

    def knock(
        self,
        command: str,
        host: str,
        *args: str,
        config: Path | None = None,
        timeout: float = 30.0,
    ) -> Knock:
        """Run the real ``fastknock`` client in the client namespace."""
        argv = [
            sys.executable,
            "-m",
            "fastknock.cli",
            "-c",
            str(config or self.client_conf),
            "-v",
            command,
            host,
            *args,
        ]
        proc = netns.run(self.pair.client, argv, env=_env(), cwd=str(REPO), timeout=timeout)
        return Knock(proc.returncode, proc.stdout + proc.stderr)

    def connects(self, src: str, dst: str, port: int) -> bool:
        return tcp_reachable(self.pair.client, src, dst, port)

    def udp(self, src: str, v6: bool = False, sport: int = 0) -> UdpPeer:
        return UdpPeer(self.pair.client, src, self.addrs(v6)[0], CONTROL_PORT, sport)

    def knock_once(
        self, src: str, rid: int, tcp: bool = False, wait: float = 5.0, sport: int = 0
    ) -> float | None:
        """One single-shot knock (no retransmission) through the oracle codec: seconds from
        KNOCK to COMEIN, or None if a reply did not come or was not the expected one.
        ``sport``: the UDP source port (0: the kernel's choice). Knocks in quick succession
        from one address want distinct ports: a UDP token is a function of the address and
        port (docs/PROTOCOL.md), so a second knock from the same port within two control
        timeouts answers a spent token and is refused as a replay."""
        peer: Peer = self.tcp(src) if tcp else self.udp(src, sport=sport)
        start = time.perf_counter()
        try:
            peer.send(signed(KEY1, KNOCK, USER1, rid))
            reply = peer.recv(wait)
            if reply is None or unpack(reply).op != CHALLENGE:
                return None
            peer.send(signed(KEY1, RESPONSE, USER1, rid, unpack(reply).auth))
            reply = peer.recv(wait)
            if reply is None or unpack(reply).op != COMEIN:
                return None
            return time.perf_counter() - start
        except OSError:
            return None
        finally:
            peer.close()

    def tcp(self, src: str, v6: bool = False) -> TcpPeer:
        return TcpPeer(self.pair.client, src, self.addrs(v6)[0], CONTROL_PORT)

    def metrics(self) -> dict[str, float]:
        """fastknockd's last metrics file: ``{'name{labels}': value}`` (empty before the
        first write)."""
        assert self.metrics_file is not None, "Stack(metrics=True) writes no metrics"
        return read_metrics(self.metrics_file)

    def server_log(self) -> str:
        assert self.server is not None
        return self.server.text()

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.work.glob("*.log")))


@contextlib.contextmanager
def fwd_only_stack(name: str, resources: Sequence[Res]) -> Iterator[Stack]:
    """A ``Stack`` (basic-auth, 1 s) with fastknockfwd only: the test starts fastknockd."""
    netns.require()
    with Stack(name, resources, "basic-auth", 1.0, start_server=False) as stack:
        yield stack


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def _tempdir(prefix: str) -> Iterator[str]:
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_metrics(path: Path) -> dict[str, float]:
    """A metrics file (Prometheus text): ``{'name{labels}': value}``; empty if missing."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def nft_counter_packets(text: str) -> int:
    m = re.search(r"counter packets (\d+) bytes \d+", text)
    assert m, f"no counter in:\n{text}"
    return int(m.group(1))
