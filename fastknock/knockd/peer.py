"""Binary peer keys: how fastknockd names a UDP peer, in Python and in the C reader alike.

A key is 18 bytes: the peer's IPv6 address (an IPv4 peer as ``::ffff:a.b.c.d``, whether it
came in on a dual-stack or an IPv4-only socket) followed by the port, big-endian. The C
reader builds the same bytes straight from the ``sockaddr`` (two ``memcpy``); the Python
paths build them from the socket module's address tuple here. Nothing compares address
*strings*, so nothing depends on how CPython formats them.

``peer_of`` gives the ``ipaddress`` object that logs and the firewall request need (only
for peers that passed basic auth); the caps' view of a key (sources, sites) is in
``limits.py``.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from fastknock.addr import IPAddress

KEY_SIZE = 18
_MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=4096)  # bounded; a flood from few hosts' many ports hits it
def _addr16(host: str) -> bytes:
    host = host.split("%", 1)[0]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host)
    return _MAPPED + socket.inet_pton(socket.AF_INET, host)


def key_of(addr: tuple) -> bytes:
    """The key of a socket-module address: ``(host, port)`` or ``(host, port, flow, scope)``."""
    return _addr16(addr[0]) + addr[1].to_bytes(2, "big")


def key_of_ip(ip: IPAddress, port: int) -> bytes:
    """The key of an ``ipaddress`` object and a port (tests, and the TCP path's peers)."""
    raw = ip.packed if ip.version == 6 else _MAPPED + ip.packed
    return raw + port.to_bytes(2, "big")


def peer_of(key: bytes) -> IPAddress:
    """The peer's address as an ``ipaddress`` object; IPv4-mapped peers are IPv4."""
    return _ip(key[:16])


@functools.lru_cache(maxsize=4096)
def _ip(addr16: bytes) -> IPAddress:
    if addr16[:12] == _MAPPED:
        return ipaddress.IPv4Address(addr16[12:])
    return ipaddress.IPv6Address(addr16)


__all__ = ["KEY_SIZE", "key_of", "key_of_ip", "peer_of"]
