"""Per-datagram peer bookkeeping of fastknockd, in the same run: the binary peer key and its
per-source key (``knockd.peer``: cached ``inet_pton``, byte slices) against the baseline of
``ipaddress`` objects built for every datagram (address object, IPv4-mapped check, IPv6 /56
network), which is what the per-source cap needed before keys were binary.

This is the Python cost of every datagram that reaches the endpoint on the ``DatagramProtocol``
path (e.g. a replayed valid KNOCK from many source ports of one host; the batched C reader
builds the key with two ``memcpy`` instead). Run: ``python bench/bench_peer.py``.
"""

from __future__ import annotations

import ipaddress
import timeit

from fastknock.knockd.limits import source_of
from fastknock.knockd.peer import key_of

N = 200_000


def per_call(fn: object, addr: tuple) -> float:
    best = min(timeit.repeat(lambda: fn(addr), number=N, repeat=5))  # type: ignore[operator]
    return best / N * 1e6


def baseline(addr: tuple) -> object:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return (ip, addr[1]), ipaddress.IPv6Network((ip, 56), strict=False)
    return (ip, addr[1]), ip


def binary(addr: tuple) -> object:
    key = key_of(addr)
    return key, source_of(key)


def main() -> None:
    print(f"{'source':<18} {'ipaddress us':>12} {'binary key us':>13} {'ratio':>7}")
    for addr in (("192.0.2.7", 4000), ("2001:db8::7", 4000, 0, 0), ("::ffff:192.0.2.7", 4000)):
        u, c = per_call(baseline, addr), per_call(binary, addr)
        print(f"{addr[0]:<18} {u:>12.2f} {c:>13.2f} {u / c:>6.1f}x")


if __name__ == "__main__":
    main()
