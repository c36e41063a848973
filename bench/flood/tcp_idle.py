"""bench/flood tcp-idle: legitimate knocks while idle TCP connections try to hold every slot.

The attack of issue 11: 16 addresses x 8 idle TCP connections to the control port, each
reconnected as soon as the server closes it. Measured in the same run: single-shot knocks
(no retransmission) over TCP and over UDP from another address, first without the attack
(the control), then with it; legit OK and p50/p99 latency in ms, plus what the server
refused or evicted meanwhile (its metrics). Run as root:

    python bench/flood/tcp_idle.py [--knocks K] [--per-source N] [--server-args ...]

Everything runs in namespaces of its own (``tests.e2e_support.Stack``); nothing leaves them.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests import netns  # noqa: E402
from tests.e2e_support import Stack, port_res  # noqa: E402
from tests.test_lockout_e2e import IdleHolders  # noqa: E402

RES = port_res(0x301, 2601)
REASONS = ("tcp-budget", "preauth-evicted", "preauth-deadline", "limits")


def row(label: str, results: list[float | None]) -> str:
    ok = sorted(x * 1000 for x in results if x is not None)

    def pct(q: float) -> float:
        return ok[min(int(q * len(ok)), len(ok) - 1)] if ok else float("nan")

    return f"{label:<34} {len(ok):>4}/{len(results):<4} {pct(0.5):8.2f} {pct(0.99):8.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knocks", type=int, default=200, help="knocks per transport and phase")
    ap.add_argument("--addresses", type=int, default=16, help="attacking addresses")
    ap.add_argument("--per-source", type=int, default=8, help="idle connections per address")
    ap.add_argument("--server-args", default="", help="extra fastknockd options")
    args = ap.parse_args()
    if netns.missing():
        print(f"tcp_idle needs root, nft and ip: {netns.missing()}")
        return 2
    stack = Stack(
        "tcpidle",
        [RES],
        timeout=5.0,
        verbose=False,
        metrics=True,
        server_args=shlex.split(args.server_args),
    )
    try:
        attackers = [f"10.77.0.{10 + i}" for i in range(args.addresses)]
        for a in attackers:
            netns.run(stack.ns, ["ip", "addr", "add", f"{a}/24", "dev", "fk1"], check=True)
        _, me, _ = stack.addrs(False)
        print(
            f"tcp-idle: {args.addresses} addresses x {args.per_source} idle TCP connections, "
            f"{args.knocks} single-shot knocks per row, fastknockd {args.server_args or 'defaults'}"
        )
        print(f"{'':<34} {'legit OK':<9} {'p50 ms':>8} {'p99 ms':>8}")
        for tcp in (True, False):
            name = "TCP" if tcp else "UDP"
            print(
                row(
                    f"{name}, no attack",
                    [stack.knock_once(me, RES.id, tcp) for _ in range(args.knocks)],
                )
            )
        before = stack.metrics()
        with IdleHolders(stack, attackers, args.per_source, limit=600.0) as idle:
            time.sleep(2.0)
            for tcp in (True, False):
                name = "TCP" if tcp else "UDP"
                label = f"{name}, {len(idle.slots)} idle connections"
                print(row(label, [stack.knock_once(me, RES.id, tcp) for _ in range(args.knocks)]))
        after = stack.metrics()
        counts = {
            r: after.get(f'fastknockd_rejected_total{{reason="{r}"}}', 0)
            - before.get(f'fastknockd_rejected_total{{reason="{r}"}}', 0)
            for r in REASONS
        }
        print(f"attacker connects: {idle.connects}; server refusals: {counts}")
    finally:
        stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
