"""Lease installs per second: fastknockfwd's batched set elements vs letmein's nft-per-lease.

Run as root: ``python bench/bench_fwd_install.py [--baseline N] [--leases N] [--batch N]``.
It creates its own network namespace (``fk-bench-<random>``), re-runs itself inside it,
loads letmein's example ruleset there and deletes the namespace at the end; the host's
ruleset is never touched. Measured in the same run:

- baseline: letmein's way, one ``nft -j -f -`` process per lease, each adding a rule
  ``ip saddr ADDR tcp dport PORT counter accept comment ...`` (JSON, as letmein sends it);
- fastknock, unbatched: one libnftables transaction per lease (set element, ``nft.Firewall``);
- fastknock, batched: ``--batch`` leases per libnftables transaction, as the daemon does
  when requests queue up behind a transaction in flight.

Prints leases/s for each and the ratios to the baseline. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from netns_rerun import rerun_in_namespace  # noqa: E402

from fastknock.conf.config import NftablesConfig  # noqa: E402
from fastknock.firewall.leases import Change, PortLease  # noqa: E402
from fastknock.firewall.nft import Firewall  # noqa: E402
from fastknock.firewall.runner import LibNftables  # noqa: E402

RULESET = """
flush ruleset
table inet filter {
    chain LETMEIN-INPUT {
    }
    chain INPUT {
        type filter hook input priority filter; policy drop;
        iifname lo accept
        ct state related,established accept
        jump LETMEIN-INPUT
        reject
    }
}
"""


def addr(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(0x0A000000 + i + 1)  # 10.0.0.1, ...


def letmein_rule_json(a: ipaddress.IPv4Address, port: int) -> str:
    rule = {
        "family": "inet",
        "table": "filter",
        "chain": "LETMEIN-INPUT",
        "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": str(a)}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": port}},
            {"counter": None},
            {"accept": None},
        ],
        "comment": f"{a}/port/{port}/TCP/accept/LETMEIN",
    }  # fmt: skip
    return json.dumps({"nftables": [{"add": {"rule": rule}}]})


def bench_baseline(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(
            ["nft", "-j", "-f", "-"], input=letmein_rule_json(addr(i), 42), text=True, check=True
        )
    return n / (time.perf_counter() - start)


def bench_fastknock(fw: Firewall, n: int, batch: int, first: int) -> float:
    changes = [Change(PortLease(addr(first + i), "tcp", 42), True, 600) for i in range(n)]
    start = time.perf_counter()
    for k in range(0, n, batch):
        errors = fw.apply(changes[k : k + batch])
        assert not any(errors), errors
    return n / (time.perf_counter() - start)


def inner(args: argparse.Namespace) -> None:
    subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
    fw = Firewall(NftablesConfig(chain_input="LETMEIN-INPUT"), LibNftables(), control_port=5800)
    fw.setup()
    base = bench_baseline(args.baseline)
    single = bench_fastknock(fw, args.single, 1, 100_000)
    batched = bench_fastknock(fw, args.leases, args.batch, 200_000)
    live = len(fw.scan())
    print(
        f"baseline  letmein-style, one nft process per lease: {base:10.0f} leases/s "
        f"({args.baseline} leases)"
    )
    print(
        f"fastknock libnftables, one transaction per lease:   {single:10.0f} leases/s "
        f"({args.single} leases)  ratio {single / base:.1f}x"
    )
    print(
        f"fastknock libnftables, {args.batch} leases per transaction: {batched:10.0f} "
        f"leases/s ({args.leases} leases)  ratio {batched / base:.1f}x"
    )
    print(f"(set elements live at the end: {live}; transactions: {fw.stats.transactions})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=int, default=300, help="leases for the nft baseline")
    ap.add_argument("--single", type=int, default=2000, help="leases, one per transaction")
    ap.add_argument("--leases", type=int, default=20000, help="leases, batched")
    ap.add_argument("--batch", type=int, default=100, help="leases per batched transaction")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
        return 0
    return rerun_in_namespace(
        __file__,
        ["--baseline", str(args.baseline), "--single", str(args.single)]
        + ["--leases", str(args.leases), "--batch", str(args.batch)],
    )


if __name__ == "__main__":
    sys.exit(main())
