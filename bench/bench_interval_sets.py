"""What a lease change costs in an interval set (prefix/range leases) vs a hash set.

Run as root: ``python bench/bench_interval_sets.py [--sizes 0,1000,10000] [--rounds 50]``.
It creates its own network namespace (``fk-bench-<random>``), re-runs itself inside it and
deletes it at the end; the host's ruleset is never touched. For each size N it fills
fastknockfwd's sets (through ``nft.Firewall``, libnftables) with N live leases, then times
``--rounds`` one-lease transactions (a new lease: ``add; delete; add``, as the daemon sends
it) and prints the median in ms for:

- the hash set ``fastknock_tcp4`` with exact leases (``ADDR . 22``): the baseline;
- the interval set ``fastknock_tcp4_ranges`` with prefix leases (``NET/24 . 22``);
- the interval set with prefix and range leases (``NET/24 . 60000-61000``);

and the ratio of each to the baseline at that size. The kernel's interval sets over
concatenations (pipapo) rebuild their lookup table on every transaction that changes them,
which is why fastknockfwd keeps exact leases out of them. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from netns_rerun import rerun_in_namespace  # noqa: E402

from fastknock.conf.config import NftablesConfig  # noqa: E402
from fastknock.firewall.leases import Change, PortLease, Source  # noqa: E402
from fastknock.firewall.nft import Firewall  # noqa: E402
from fastknock.firewall.runner import LibNftables  # noqa: E402

RULESET = "flush ruleset\ntable inet filter {\n    chain LETMEIN-INPUT {\n    }\n}\n"


def exact(i: int) -> Source:
    return ipaddress.IPv4Address(0x0A000000 + i)


def prefix(i: int) -> Source:
    return ipaddress.IPv4Network((0x0A000000 + (i << 8), 24))


KINDS: list[tuple[str, Callable[[int], Source], int | None]] = [
    ("hash set, exact ADDR . 22", exact, None),
    ("interval set, NET/24 . 22", prefix, None),
    ("interval set, NET/24 . 60000-61000", prefix, 61000),
]


def lease(make: Callable[[int], Source], last: int | None, i: int) -> PortLease:
    return PortLease(make(i), "tcp", 60000 if last else 22, last)


def median_ms(
    fw: Firewall, make: Callable[[int], Source], last: int | None, n: int, rounds: int
) -> float:
    fill = [Change(lease(make, last, i), True, 600) for i in range(n)]
    for k in range(0, n, 500):
        assert not any(fw.apply(fill[k : k + 500]))
    times = []
    for r in range(rounds):
        change = Change(lease(make, last, 50_000 + r), True, 600)
        start = time.perf_counter()
        assert fw.apply([change]) == [None]
        times.append(time.perf_counter() - start)
    gone = [Change(c.key, False) for c in fill]
    gone += [Change(lease(make, last, 50_000 + r), False) for r in range(rounds)]
    for k in range(0, len(gone), 500):
        assert not any(fw.apply(gone[k : k + 500]))
    return statistics.median(times) * 1000


def inner(args: argparse.Namespace) -> None:
    subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
    cfg = NftablesConfig(chain_input="LETMEIN-INPUT")
    fw = Firewall(cfg, LibNftables(), control_port=5800, ranges=True)
    fw.setup()
    print(f"one-lease transaction, median of {args.rounds} (ms), libnftables")
    print(f"{'live leases':>11}  {'kind':<36} {'ms':>8} {'ratio':>7}")
    for n in args.sizes:
        base = 0.0
        for name, make, last in KINDS:
            ms = median_ms(fw, make, last, n, args.rounds)
            base = base or ms
            print(f"{n:>11}  {name:<36} {ms:8.2f} {ms / base:6.1f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0,1000,10000", help="live leases, comma-separated")
    ap.add_argument("--rounds", type=int, default=50, help="timed transactions per size")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    if args.inner:
        inner(args)
        return 0
    return rerun_in_namespace(
        __file__, ["--sizes", ",".join(map(str, args.sizes)), "--rounds", str(args.rounds)]
    )


if __name__ == "__main__":
    sys.exit(main())
