"""The wire side of the end-to-end tests: an independent codec and raw peers.

- An *independent* codec of PROTOCOL.md's message (``pack``/``unpack``/``sign``, with
  ``hmac`` + ``hashlib`` only), so the tests judge the daemons with an oracle that shares no
  code with them.
- ``UdpPeer``/``TcpPeer``: raw control-port clients in a namespace, bound to a chosen source
  address, that record every byte the server sends back.
- ``Listeners``: the TCP services behind the protected ports; ``tcp_reachable`` probes one.
- ``Sniffer``: an AF_PACKET socket on the server's veth that captures control datagrams.

The daemons, configs and namespaces around them are ``tests.e2e_support``; nothing here
touches the host's network: every socket lives in a namespace a test created.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

from tests import netns

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
