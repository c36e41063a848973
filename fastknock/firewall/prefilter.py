"""The in-kernel pre-filter of a UDP control port (nftables rules kept by fastknockfwd).

Design
------
With ``[NFTABLES] prefilter = on`` (the default) and a UDP control port, fastknockfwd keeps
a base chain of its own in the configured table, hooked before everything else::

    chain fastknock-prefilter {
        type filter hook prerouting priority raw; policy accept;
        udp dport 5800 fib daddr type local udp length != 64 drop     (payload is not 56)
        udp dport 5800 fib daddr type local update @fastknock_prefilter4
            { ip saddr limit rate over 100/second burst 200 packets } drop
        udp dport 5800 fib daddr type local update @fastknock_prefilter6
            { ip6 saddr & ffff:ffff:ffff:ffff:: limit rate over 100/second burst 200 packets } drop
    }

* Wrong sizes and a flooding source are dropped in the kernel before any socket queue, so
  one source cannot fill the receive buffer for everyone else. Rate, burst and the IPv6
  prefix come from ``prefilter-rate``/``-burst``/``-ipv6-prefix``.
* Why a base chain at ``prerouting`` / ``raw`` priority and not rules in chain-input: it
  runs before conntrack, so a flood creates no conntrack entries, and no ``ct state
  established accept`` of the admin's ruleset can let a flow around it. (A valid KNOCK
  replayed from many source ports draws CHALLENGEs, which make those flows "established"
  in conntrack: rules in chain-input, behind letmein's ``ct state established accept``,
  would stop limiting exactly that flood.) ``fib daddr type local`` keeps it to datagrams
  for this host, not ones routed through it. A legitimate knock is two datagrams.
* The two dynamic sets (``flags dynamic,timeout``, 60 s idle timeout, at most 65536
  sources each) hold one token bucket per source. ``update`` refreshes the timeout, so a
  source that keeps flooding keeps its (empty) bucket.
* The chain is the daemon's own: each start or reload flushes and refills it in the same
  transaction (atomic, so never a moment without it), so a changed config takes effect;
  ``prefilter = off`` deletes it (the empty sets stay, harmless).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from fastknock.conf.config import NftablesConfig

CHAIN = "fastknock-prefilter"
COMMENT_PREFIX = "fastknock:prefilter-"  # rules of an older layout in chain-input: removed
SET_PREFIX = "fastknock_prefilter"
SET_TIMEOUT = 60  # seconds a quiet source's token bucket is kept
SET_SIZE = 65536
CONTROL_UDP_LENGTH = 64  # UDP header (8) + one 56-byte message


def rules(cfg: NftablesConfig, versions: Sequence[int], udp_port: int | None) -> list[str]:
    """The pre-filter chain's rules, in order; empty if it is off or there is no UDP
    control port."""
    if not cfg.prefilter or not udp_port:
        return []
    match = f"udp dport {udp_port} fib daddr type local"
    limit = f"limit rate over {cfg.prefilter_rate}/second burst {cfg.prefilter_burst} packets"
    out = [f"{match} udp length != {CONTROL_UDP_LENGTH} drop"]
    if 4 in versions:
        out.append(f"{match} update @{SET_PREFIX}4 {{ ip saddr {limit} }} drop")
    if 6 in versions:
        bits = cfg.prefilter_ipv6_prefix
        key = "ip6 saddr"
        if bits < 128:
            key += f" and {ipaddress.IPv6Network(f'::/{bits}').netmask}"
        out.append(f"{match} update @{SET_PREFIX}6 {{ {key} {limit} }} drop")
    return out


def commands(
    cfg: NftablesConfig,
    where: str,
    versions: Sequence[int],
    udp_port: int | None,
    chain_exists: bool,
) -> list[str]:
    """nft commands that make the pre-filter chain exactly as configured (or remove it).
    ``where``: "FAMILY TABLE"."""
    wanted = rules(cfg, versions, udp_port)
    if not wanted:
        if not chain_exists:
            return []
        return [f"flush chain {where} {CHAIN}", f"delete chain {where} {CHAIN}"]
    cmds = []
    for version in versions:
        typ = "ipv4_addr" if version == 4 else "ipv6_addr"
        cmds.append(
            f"add set {where} {SET_PREFIX}{version} {{ type {typ}; size {SET_SIZE}; "
            f"flags dynamic,timeout; timeout {SET_TIMEOUT}s; }}"
        )
    cmds.append(
        f"add chain {where} {CHAIN} {{ type filter hook prerouting priority raw; policy accept; }}"
    )
    cmds.append(f"flush chain {where} {CHAIN}")
    cmds += [f"add rule {where} {CHAIN} {rule}" for rule in wanted]
    return cmds
