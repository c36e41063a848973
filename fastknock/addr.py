"""Client IP addresses: the one type and the one normalisation, shared by every process.

An IPv4 client reaching a dual-stack socket shows up as an IPv4-mapped IPv6 address
(``::ffff:a.b.c.d``); fastknock treats it as the IPv4 client it is, everywhere: in the
server's per-peer state, on the wire to fastknockfwd and in the firewall. ``normalize`` is
applied once where an address enters (a socket peer name, ``ipc.decode_request``), never
again downstream. Stdlib only; cached (bounded), as a flood from many ports of few hosts
hits the same few addresses.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["IPAddress", "normalize"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def normalize(host: str | IPAddress) -> IPAddress:
    """Parse a socket peer address (a scope ``%eth0`` is dropped) or take an address; an
    IPv4-mapped IPv6 address becomes the IPv4 address."""
    addr = ipaddress.ip_address(host.split("%", 1)[0] if isinstance(host, str) else host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
