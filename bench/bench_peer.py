"""Per-datagram peer bookkeeping of fastknockd: parsing the source address and the per-source
key, uncached (``ipaddress`` every time) vs the bounded LRU caches, in the same run.

This is the Python cost of every datagram that reaches ``UdpControl`` (e.g. a replayed valid
KNOCK from many source ports of one host). Run: ``python bench/bench_peer.py``.
"""

from __future__ import annotations

import timeit

from fastknock.knockd.control import source_key
from fastknock.protocol import normalize_peer

N = 200_000


def per_call(fn: object, addr: str) -> float:
    best = min(timeit.repeat(lambda: fn(addr), number=N, repeat=5))  # type: ignore[operator]
    return best / N * 1e6


def uncached(addr: str) -> object:
    return source_key.__wrapped__(normalize_peer.__wrapped__(addr))


def cached(addr: str) -> object:
    return source_key(normalize_peer(addr))


def main() -> None:
    print(f"{'source':<16} {'uncached us':>12} {'cached us':>10} {'ratio':>7}")
    for addr in ("192.0.2.7", "2001:db8::7", "::ffff:192.0.2.7"):
        assert uncached(addr) == cached(addr)
        u, c = per_call(uncached, addr), per_call(cached, addr)
        print(f"{addr:<16} {u:>12.2f} {c:>10.2f} {u / c:>6.1f}x")


if __name__ == "__main__":
    main()
