"""The in-kernel pre-filter of a UDP control port (nftables rules kept by fastknockfwd).

Design
------
With ``[NFTABLES] prefilter = on`` (the default) and a UDP control port, fastknockfwd keeps
these rules at the top of chain-input, before the control-port accept rule (``nft.py``)::

    udp dport 5800 udp length != 64 drop                       (payload is not 56 bytes)
    udp dport 5800 update @fastknock_prefilter4 { ip saddr limit rate over 100/second
        burst 200 packets } drop
    udp dport 5800 update @fastknock_prefilter6 { ip6 saddr & ffff:ffff:ffff:ffff::
        limit rate over 100/second burst 200 packets } drop     (IPv6 per /64 by default)

* Wrong sizes and a flooding source are dropped in the kernel before any socket queue, so
  one source cannot fill the receive buffer for everyone else. Rate, burst and the IPv6
  prefix come from ``prefilter-rate``/``-burst``/``-ipv6-prefix``.
* The two dynamic sets (``flags dynamic,timeout``, 60 s idle timeout, at most 65536
  sources each) hold one token bucket per source. ``update`` refreshes the timeout, so a
  source that keeps flooding keeps its (empty) bucket.
* In letmein's ruleset the later datagrams of a session are conntrack ESTABLISHED and
  accepted before chain-input is reached, so a legitimate session is never limited after
  its first datagram.
* The comments carry the parameters (``fastknock:prefilter-rate4:PORT:RATE:BURST``), so a
  changed config is seen at the next start or reload and the rules are replaced;
  ``prefilter = off`` removes them (the empty sets stay, harmless).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from fastknock.config import NftablesConfig

COMMENT_PREFIX = "fastknock:prefilter-"
SET_PREFIX = "fastknock_prefilter"
SET_TIMEOUT = 60  # seconds a quiet source's token bucket is kept
SET_SIZE = 65536
CONTROL_UDP_LENGTH = 64  # UDP header (8) + one 56-byte message


def rules(
    cfg: NftablesConfig, versions: Sequence[int], udp_port: int | None
) -> list[tuple[str, str]]:
    """(comment, rule) of the pre-filter, in chain order; empty if it is off or there is
    no UDP control port."""
    if not cfg.prefilter or not udp_port:
        return []
    port = udp_port
    rate, burst = cfg.prefilter_rate, cfg.prefilter_burst
    limit = f"limit rate over {rate}/second burst {burst} packets"
    out = [
        (
            f"{COMMENT_PREFIX}size:{port}",
            f"udp dport {port} udp length != {CONTROL_UDP_LENGTH} drop",
        )
    ]
    if 4 in versions:
        out.append(
            (
                f"{COMMENT_PREFIX}rate4:{port}:{rate}:{burst}",
                f"udp dport {port} update @{SET_PREFIX}4 {{ ip saddr {limit} }} drop",
            )
        )
    if 6 in versions:
        bits = cfg.prefilter_ipv6_prefix
        key = "ip6 saddr"
        if bits < 128:
            key += f" and {ipaddress.IPv6Network(f'::/{bits}').netmask}"
        out.append(
            (
                f"{COMMENT_PREFIX}rate6:{port}:{rate}:{burst}:{bits}",
                f"udp dport {port} update @{SET_PREFIX}6 {{ {key} {limit} }} drop",
            )
        )
    return out


def commands(
    cfg: NftablesConfig,
    where: str,
    versions: Sequence[int],
    udp_port: int | None,
    chain_rules: Sequence[tuple[str, int]],
) -> list[str]:
    """nft commands that make the pre-filter the first rules of chain-input, exactly as
    configured. ``chain_rules``: (comment or "", handle) of every rule in chain-input, in
    order; ``where``: "FAMILY TABLE"."""
    chain = cfg.chain_input
    wanted = rules(cfg, versions, udp_port)
    cmds = []
    for version in versions if wanted else ():
        typ = "ipv4_addr" if version == 4 else "ipv6_addr"
        cmds.append(
            f"add set {where} {SET_PREFIX}{version} {{ type {typ}; size {SET_SIZE}; "
            f"flags dynamic,timeout; timeout {SET_TIMEOUT}s; }}"
        )
    have = [(c, h) for c, h in chain_rules if c.startswith(COMMENT_PREFIX)]
    top = [c for c, _ in chain_rules[: len(have)]]
    if top == [c for c, _ in have] == [c for c, _ in wanted]:
        return cmds  # in place: exactly the wanted rules, in order, at the top
    for _, handle in have:
        cmds.append(f"delete rule {where} {chain} handle {handle}")
    for comment, rule in reversed(wanted):  # each insert goes to the top
        cmds.append(f'insert rule {where} {chain} {rule} comment "{comment}"')
    return cmds
