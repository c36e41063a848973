"""Network-namespace helpers for end-to-end tests on the real kernel (root only).

Everything here works inside namespaces that the helpers create and delete; nothing
touches the host's own network or nftables ruleset. Typical use::

    from tests import netns

    netns.require()                       # skip (or fail when $CI is set) without root/nft/ip
    with netns.veth_pair() as pair:       # two namespaces joined by a veth pair
        netns.load_ruleset(pair.server, netns.COMPAT_RULESET, extra=netns.MYCHAINS)
        proc = netns.popen(pair.server, [sys.executable, "-m", "fastknock.fwd", ...])
        with netns.socket_in(pair.server, socket.AF_INET, socket.SOCK_STREAM) as lst:
            lst.bind((pair.server_v4, 42)); lst.listen()
            assert not netns.tcp_connects(pair.client, pair.client_v4[0], pair.server_v4, 42)

API
---
- ``missing() -> str | None``: why e2e tests cannot run here (not root, no nft, no ip).
- ``require()``: ``pytest.skip`` with that reason, or ``pytest.fail`` when ``$CI`` is set.
- ``namespace(prefix)``: context manager, a fresh namespace ``fk-<prefix>-<random>`` with
  ``lo`` up; deleted on exit, also on failure.
- ``veth_pair()``: context manager yielding a ``Pair``: server and client namespaces, veth
  between them, server ``10.77.0.1`` / ``fd77::1``, client ``10.77.0.2, 10.77.0.3`` /
  ``fd77::2, fd77::3`` (the second address of each family is "another client").
- ``run(ns, argv)``, ``popen(ns, argv)``: ``ip netns exec ns argv``.
- ``nft(ns, *args)``, ``load_ruleset(ns, path, extra="")``: nft inside ``ns`` only.
- ``entered(ns)``: context manager that moves the *calling thread* into ``ns`` (setns)
  and back; ``socket_in(ns, family, type)`` makes a socket that lives in ``ns``.
- ``tcp_connects(ns, src, dst, port)``, ``udp_delivers(ns, src, receiver, dst, port)``:
  probes from a client namespace, binding the given source address.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# letmein's example ruleset, copied into the repository (tests never read outside it).
COMPAT_RULESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat", "nftables.conf")
MYCHAINS = """
add chain inet filter MYCHAIN-INPUT
add chain inet filter MYCHAIN-FORWARD
add chain inet filter MYCHAIN-OUTPUT
"""
CLONE_NEWNET = 0x40000000


def missing() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, nftables)"
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            return f"end-to-end tests need the {tool!r} tool"
    return None


def require() -> None:
    import pytest

    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace(prefix: str = "t") -> Iterator[str]:
    name = f"fk-{prefix}-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Pair:
    server: str
    client: str
    server_v4: str = "10.77.0.1"
    server_v6: str = "fd77::1"
    client_v4: list[str] = field(default_factory=lambda: ["10.77.0.2", "10.77.0.3"])
    client_v6: list[str] = field(default_factory=lambda: ["fd77::2", "fd77::3"])


@contextlib.contextmanager
def veth_pair() -> Iterator[Pair]:
    with namespace("srv") as srv, namespace("cli") as cli:
        pair = Pair(srv, cli)
        _ip("link", "add", "fk0", "netns", srv, "type", "veth", "peer", "name", "fk1", "netns", cli)
        _ip("-n", srv, "addr", "add", f"{pair.server_v4}/24", "dev", "fk0")
        _ip("-n", srv, "addr", "add", f"{pair.server_v6}/64", "dev", "fk0", "nodad")
        for a in pair.client_v4:
            _ip("-n", cli, "addr", "add", f"{a}/24", "dev", "fk1")
        for a in pair.client_v6:
            _ip("-n", cli, "addr", "add", f"{a}/64", "dev", "fk1", "nodad")
        _ip("-n", srv, "link", "set", "fk0", "up")
        _ip("-n", cli, "link", "set", "fk1", "up")
        yield pair


def run(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)


def popen(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    """Run nft inside ``ns``; raise RuntimeError with nft's message on failure."""
    proc = run(ns, ["nft", *args], input=stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} in {ns}: {proc.stderr.strip()}")
    return proc.stdout


def load_ruleset(ns: str, path: str = COMPAT_RULESET, extra: str = "") -> None:
    """Load ``path`` (it may 'flush ruleset': that flushes the namespace's ruleset only)."""
    nft(ns, "-f", path)
    if extra:
        nft(ns, "-f", "-", stdin=extra)


_libc = ctypes.CDLL(None, use_errno=True)
_ns_lock = threading.RLock()  # re-entrant: nested entered() of one thread


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``ns``."""
    with _ns_lock:
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def socket_in(ns: str, family: int, type: int) -> socket.socket:
    with entered(ns):
        return socket.socket(family, type)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# Without IP(V6)_RECVERR, Linux treats an ICMP(v6) "port unreachable" answering a SYN as a
# soft error and lets connect() run into its timeout; with it, a refusal returns at once.
IP_RECVERR, IPV6_RECVERR = 11, 25


def tcp_connects(ns: str, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from ``src`` (in ``ns``) to ``dst:port`` is accepted.
    Refusals (RST or ICMP) return False at once; ``timeout`` only bounds a dropped SYN."""
    family = _family(dst)
    with socket_in(ns, family, socket.SOCK_STREAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.settimeout(timeout)
        sock.bind((src, 0))
        try:
            sock.connect((dst, port))
            return True
        except OSError:
            return False


def udp_delivers(
    ns: str, src: str, receiver: socket.socket, dst: str, port: int, timeout: float = 0.5
) -> bool:
    """Whether a datagram from ``src`` (in ``ns``) to ``dst:port`` reaches ``receiver``."""
    token = secrets.token_bytes(8)
    with socket_in(ns, _family(dst), socket.SOCK_DGRAM) as sock:
        sock.bind((src, 0))
        sock.sendto(token, (dst, port))
    receiver.settimeout(timeout)
    try:
        while True:
            data, _ = receiver.recvfrom(64)
            if data == token:
                return True
    except (TimeoutError, OSError):
        return False
