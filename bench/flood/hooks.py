"""bench/flood/hooks.py: the kernel's cost per datagram the pre-filter drops, by hook (root).

    python bench/flood/hooks.py [--seconds S] [--rounds R]

Design
------
* What it answers: is an ``ingress`` hook on the control port's interface cheaper per
  dropped datagram than the product's ``prerouting`` chain at ``raw`` priority
  (``fastknock.firewall.prefilter``)? It builds the rule sets by hand (the product's two
  IPv4 rules: wrong UDP length, then the per-source token bucket over a dynamic set; see
  ``ruleset`` for the variants) in a throwaway pair of namespaces (``tests.netns``), never
  through the product, and also a "none" row where the datagrams reach a socket that
  drains them.
* Where the cost lands: this kernel has no ``CONFIG_IRQ_TIME_ACCOUNTING``, and a veth
  transmit runs the receiving side's softirq (netif_rx backlog, the hooks, the drop) on
  the sending CPU, mostly in the sender's own context. So the flood generator's CPU time
  (``getrusage``, printed by ``floodgen send``) plus the ksoftirqd threads' (when the
  backlog is deferred to them) is the whole path: send, receive, hook, drop. The send half is the
  same in every row, so the differences between rows are the differences between hooks.
  Reported: ns of that CPU per datagram sent, per row and mode.
* Modes: ``wrongsize`` (100-byte payload: the length rule drops it) and ``junk`` (56 bytes
  from one source: past the burst the token bucket drops it). Rounds are interleaved
  (none, prerouting, ingress, none, ...) so a change in the machine's load hits every row
  alike; the spread between rounds is the noise.
* A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tests import netns  # noqa: E402

PORT = 5800
RATE, BURST = 100, 200
CLK_TCK = os.sysconf("SC_CLK_TCK")
MATCH = f"udp dport {PORT} fib daddr type local"
LIMIT = f"limit rate over {RATE}/second burst {BURST} packets"
SET = "set pf4 { type ipv4_addr; size 65536; flags dynamic,timeout; timeout 60s; }"


HOOKS = ("none", "prerouting", "prerouting-set", "ingress-set")


def ruleset(hook: str, server: str) -> str:
    """The pre-filter by hand. ``prerouting``: today's chain (prerouting, raw priority,
    ``fib daddr type local``). The ingress hook runs before routing and the kernel refuses
    ``fib`` there ("Operation not supported"), so "for this host" becomes a set of the
    host's addresses (``@local4``): ``ingress-set`` on fk0 (the server's veth; the inet
    family's ingress hook, kernel >= 5.10) and, to tell the hook from the match,
    ``prerouting-set`` (the same set at today's hook)."""
    if hook == "none":
        return "table inet fkbench { }\n"
    where = "hook prerouting priority raw"
    match = MATCH
    if hook.endswith("-set"):
        match = f"udp dport {PORT} ip daddr @local4"
    if hook.startswith("ingress"):
        where = 'hook ingress device "fk0" priority -500'
    return (
        "table inet fkbench {\n"
        f"  {SET}\n"
        f"  set local4 {{ type ipv4_addr; elements = {{ {server} }}; }}\n"
        f"  chain pf {{ type filter {where}; policy accept;\n"
        f"    {match} udp length != 64 drop\n"
        f"    {match} update @pf4 {{ ip saddr {LIMIT} }} drop\n"
        "  }\n}\n"
    )


def ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def ksoftirqd() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().startswith("ksoftirqd/"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def one(pair: netns.Pair, floodgen: str, mode: str, seconds: float) -> tuple[float, int]:
    soft = ksoftirqd()
    gen = netns.popen(
        pair.client,
        [floodgen, "send", "--mode", mode, "--src", pair.client_v4[0], "--dst",
         pair.server_v4, "--port", str(PORT), "--seconds", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    s0 = ticks(soft)
    out, _ = gen.communicate(timeout=seconds + 30)
    kv = dict(x.split("=") for x in out.split())
    # The generator reports its own CPU (getrusage): its /proc entry is gone once it exited.
    cpu = float(kv["cpu"])
    soft_s = (ticks(soft) - s0) / CLK_TCK
    sent = int(kv["sent"])
    return (cpu + soft_s) / sent * 1e9, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if netns.missing() or shutil.which("cc") is None:
        print(f"needs root, nft, ip and cc: {netns.missing() or 'no cc'}")
        return 2
    hooks = HOOKS
    modes = ("wrongsize", "junk")
    work = Path(tempfile.mkdtemp(prefix="fk-hooks-"))
    try:
        floodgen = str(work / "floodgen")
        subprocess.run(["cc", "-O2", "-Wall", "-o", floodgen, str(HERE / "floodgen.c")], check=True)
        with netns.veth_pair() as pair:
            netns.load_ruleset(pair.server, netns.COMPAT_RULESET, netns.MYCHAINS)
            drain = netns.popen(
                pair.server,
                [floodgen, "drain", "--port", str(PORT), "--seconds", "100000"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert drain.stdout is not None and drain.stdout.readline().strip() == "ready"
            results: dict[tuple[str, str], list[float]] = {}
            try:
                for r in range(args.rounds):
                    for hook in hooks:
                        netns.nft(pair.server, "-f", "-", stdin=ruleset(hook, pair.server_v4))
                        for mode in modes:
                            ns_per, sent = one(pair, floodgen, mode, args.seconds)
                            results.setdefault((hook, mode), []).append(ns_per)
                            print(f"round {r} {hook:<10} {mode:<9} {sent / args.seconds / 1e3:6.0f}"
                                  f" k/s sent  {ns_per:6.0f} ns/dg", flush=True)  # fmt: skip
                        netns.nft(pair.server, "delete", "table", "inet", "fkbench")
            finally:
                drain.kill()
                drain.wait()
        print("\nns of CPU (generator + ksoftirqd) per datagram sent, median of rounds [min-max]:")
        print(f"  {'hook':<11} " + "  ".join(f"{m:>22}" for m in modes))
        for hook in hooks:
            cells = []
            for mode in modes:
                xs = sorted(results[(hook, mode)])
                cells.append(f"{xs[len(xs) // 2]:6.0f} [{xs[0]:5.0f}-{xs[-1]:5.0f}]".rjust(22))
            print(f"  {hook:<11} " + "  ".join(cells))
        for mode in modes:
            pre = sorted(results[("prerouting", mode)])[args.rounds // 2]
            for other in HOOKS[2:]:
                x = sorted(results[(other, mode)])[args.rounds // 2]
                print(f"  {mode}: {other} - prerouting = {x - pre:+.0f} ns/dg")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
