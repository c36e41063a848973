"""Support for the end-to-end tests of fastknockd (tests/test_server_e2e.py).

- ``Stack``: one veth namespace pair (``tests.netns``) with letmein's example ruleset, TCP
  listeners on the protected ports, the real ``fastknockfwd`` and ``fastknockd`` as
  subprocesses (PIDs kept; only those are ever signalled), and the real ``fastknock`` client.
- The configs the tests write (``server_config``, ``client_config``, ``Res``), the daemons
  as processes (``Daemon``), metrics and nft counter readers.
- The codec oracle and the raw peers are ``tests.e2e_peers``.

Nothing here touches the host's network or ruleset: all sockets, rules and processes live in
the namespaces the ``Stack`` creates, and ``Stack.close`` removes them, also after failures.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastknock import ipc
from tests import netns
from tests.e2e_peers import (
    CHALLENGE,
    COMEIN,
    KNOCK,
    RESPONSE,
    Listeners,
    Peer,
    TcpPeer,
    UdpPeer,
    signed,
    tcp_reachable,
    unpack,
)

REPO = Path(__file__).resolve().parent.parent

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
