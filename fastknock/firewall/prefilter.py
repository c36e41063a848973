"""The in-kernel pre-filter of a UDP control port (nftables rules kept by fastknockfwd).

Design
------
With ``[NFTABLES] prefilter = on`` (the default) and a UDP control port, fastknockfwd keeps
a base chain of its own in the configured table, hooked before everything else, and the
regular chains it jumps to (S is the random seed, R/B the per-source rate and burst, G =
GROUP_FACTOR)::

    chain fastknock-prefilter {
        type filter hook prerouting priority raw; policy accept;
        udp dport 5800 fib daddr type local jump fastknock-prefilter-udp   (one fib lookup)
    }
    chain fastknock-prefilter-udp {
        udp length != 64 counter name fastknock_pf_dropped_size drop   (payload is not 56)
        ip saddr @fastknock_proven4 counter name fastknock_pf_proven accept
        ip6 saddr @fastknock_proven6 counter name fastknock_pf_proven accept
        update @fastknock_pf_slots4 { jhash ip saddr mod 65536 seed S
            limit rate over R/second burst B packets } jump fastknock-prefilter-ip4
        update @fastknock_pf_slots6 { jhash ip6 saddr & /64 mod 65536 seed S
            limit rate over R/second burst B packets } jump fastknock-prefilter-ip6
        update @fastknock_pf_slots6g { jhash ip6 saddr & /48 mod 65536 seed S
            limit rate over G*R/second burst G*B packets } jump fastknock-prefilter-ip6group
    }                                          (falls back to the base chain: accept)
    chain fastknock-prefilter-ip4 {            (one per reason: ip4, ip6, ip6group)
        limit name fastknock_pf_spare counter name fastknock_pf_spared_ip4 accept
        add @fastknock_pf_top4 { ip saddr counter }
        counter name fastknock_pf_dropped_ip4 drop
    }

* **It cannot be filled.** The token buckets are keyed by a keyed hash of the source
  (``jhash ... mod SLOTS`` with a 32-bit seed drawn at each start and reload), so each set
  holds at most SLOTS (65,536) buckets, its size: no source ever finds it full, however
  many sources there are (the old per-address sets stopped limiting anyone once 65,536
  spoofed sources had filled them). The slots never expire (a bucket refills by itself).
  Without the seed an attacker cannot pick a source that shares a victim's slot; K real
  flooding sources share a bucket with a given victim with probability about K/65,536.
  (jhash is fast, not cryptographic: the seed stays secret because only root can list
  the ruleset and a stealth server never shows which datagrams passed.) Memory is bounded
  too: at most 3 x 65,536 elements (about 210 bytes each, measured: ~14 MB per full set).
* **Per source and per IPv6 group.** IPv4: one bucket per address. IPv6: per
  ``prefilter-ipv6-prefix`` (/64, a host's allocation), and per ``prefilter-ipv6-group``
  (/48, a site's allocation; /56s come out of it) at GROUP_FACTOR times the allowance, so
  one /48's 65,536 /64s together get 16 hosts' worth, not 65,536.
* **It only cuts what the server could not absorb.** What a source sends beyond its own
  allowance is not dropped yet: it passes while the shared spare allowance
  (``prefilter-spare`` datagrams/s, default 20,000, one second of burst) lasts, and only
  the excess is dropped. A flood that spoofs a victim's address (random source ports)
  empties the victim's bucket, but below the spare rate it all passes and the server
  (its C receive path drains 200,000+ datagrams/s) throws the junk away, so the victim's
  own knocks get through: the per-source bucket is no longer a tool to aim at one victim.
  Above the spare rate the victim's datagrams compete with the flood's for the spare
  (nothing in the kernel can tell them apart) unless the victim proved the key recently:
* **Proven sources pass first.** ``firewall.nft`` adds the address of every lease it
  installs to ``fastknock_proven4/6`` (timeout: the lease's, at least PROVEN_TIMEOUT), in
  the same transaction. Only fastknockfwd adds to them, after a full authentication, so
  they grow with keyed knocks only.
* **Before conntrack.** A base chain at ``prerouting`` / ``raw`` runs before conntrack, so
  a flood creates no conntrack entries, and no ``ct state established accept`` of the
  admin's ruleset lets a flow around it (a replayed valid KNOCK draws CHALLENGEs, which
  make the flow "established"). ``fib daddr type local`` keeps it to datagrams for this
  host. A legitimate knock is two datagrams.
* **Counters for the operator.** Named counters per refusal reason (``COUNTERS``); the
  shed chains also sample the dropped sources into small ``fastknock_pf_top*`` sets with a
  counter each (256 entries, 60 s), so fastknockfwd can name the top source prefix in its
  warning (``Shedding``: at most one line a minute) without any per-packet work of its own.
* The chains are the daemon's own: each start or reload flushes and refills them in one
  transaction (atomic, so never a moment without the pre-filter), so a changed config (or
  seed) takes effect; ``prefilter = off`` deletes the chains (the sets and counters stay,
  harmless). The per-address sets of the previous layout are deleted.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fastknock.conf.config import NftablesConfig

CHAIN = "fastknock-prefilter"  # the base chain
UDP_CHAIN = f"{CHAIN}-udp"  # the control port's datagrams
COMMENT_PREFIX = "fastknock:prefilter-"  # rules of an older layout in chain-input: removed
OLD_SETS = ("fastknock_prefilter4", "fastknock_prefilter6")  # per-address buckets, fillable
SLOTS = 65536  # token buckets per key kind: the sets' size, never exceeded
GROUP_FACTOR = 16  # an IPv6 group's allowance, in per-source allowances
PROVEN_TIMEOUT = 600  # seconds a proven source passes first, at least
TOP_SIZE = 256  # sampled dropped sources per reason (for the log line)
TOP_TIMEOUT = 60
CONTROL_UDP_LENGTH = 64  # UDP header (8) + one 56-byte message
SPARE = "fastknock_pf_spare"
PROVEN_SET = "fastknock_proven"  # + "4" / "6"
REASONS = ("ip4", "ip6", "ip6group")  # over a bucket's allowance; each has a shed chain
COUNTERS = (
    "dropped_size", "proven", *(f"{kind}_{r}" for r in REASONS for kind in ("spared", "dropped"))
)  # fmt: skip


def _suffix(reason: str) -> str:
    return {"ip4": "4", "ip6": "6", "ip6group": "6g"}[reason]


def top_set(reason: str) -> str:
    """The set that samples the sources dropped for ``reason``."""
    return f"fastknock_pf_top{_suffix(reason)}"


def _mask(bits: int) -> str:
    return str(ipaddress.IPv6Network(f"::/{bits}").netmask)


@dataclass(frozen=True, slots=True)
class _Bucket:
    reason: str  # "ip4" | "ip6" | "ip6group"
    key: str  # the nft expression of the source key
    rate: int
    burst: int

    @property
    def slots(self) -> str:
        return f"fastknock_pf_slots{_suffix(self.reason)}"

    @property
    def chain(self) -> str:
        return f"{CHAIN}-{self.reason}"

    @property
    def top(self) -> str:
        return top_set(self.reason)

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.reason == "ip4" else "ipv6_addr"


def _buckets(cfg: NftablesConfig, versions: Sequence[int]) -> list[_Bucket]:
    rate, burst = cfg.prefilter_rate, cfg.prefilter_burst
    out = []
    if 4 in versions:
        out.append(_Bucket("ip4", "ip saddr", rate, burst))
    if 6 in versions:
        bits = cfg.prefilter_ipv6_prefix
        out.append(_Bucket("ip6", "ip6 saddr" + (f" & {_mask(bits)}" if bits < 128 else ""),
                           rate, burst))  # fmt: skip
        group = cfg.prefilter_ipv6_group
        if group < bits:
            out.append(_Bucket("ip6group", f"ip6 saddr & {_mask(group)}",
                               rate * GROUP_FACTOR, burst * GROUP_FACTOR))  # fmt: skip
    return out


def active(cfg: NftablesConfig, udp_port: int | None) -> bool:
    return bool(cfg.prefilter and udp_port)


def counter_name(reason: str) -> str:
    return f"fastknock_pf_{reason}"


def rules(
    cfg: NftablesConfig, versions: Sequence[int], udp_port: int | None, seed: int
) -> dict[str, list[str]]:
    """Chain name -> its rules, in order (each chain before the ones it jumps to); empty if
    the pre-filter is off or there is no UDP control port."""
    if not active(cfg, udp_port):
        return {}
    size = f'udp length != {CONTROL_UDP_LENGTH} counter name "{counter_name("dropped_size")}"'
    main = [f"{size} drop"]
    for version, ipf in ((4, "ip"), (6, "ip6")):
        if version in versions:
            main.append(f'{ipf} saddr @{PROVEN_SET}{version} '
                        f'counter name "{counter_name("proven")}" accept')  # fmt: skip
    out = {CHAIN: [f"udp dport {udp_port} fib daddr type local jump {UDP_CHAIN}"], UDP_CHAIN: main}
    for b in _buckets(cfg, versions):
        limit = f"limit rate over {b.rate}/second burst {b.burst} packets"
        main.append(
            f"update @{b.slots} {{ jhash {b.key} mod {SLOTS} seed {seed:#010x} {limit} }}"
            f" jump {b.chain}"
        )
        spared = f'limit name "{SPARE}" counter name "{counter_name("spared_" + b.reason)}"'
        out[b.chain] = [f"{spared} accept"] if cfg.prefilter_spare else []  # 0: no spare
        out[b.chain] += [
            f"add @{b.top} {{ {b.key} counter }}",
            f'counter name "{counter_name("dropped_" + b.reason)}" drop',
        ]
    return out


def commands(
    cfg: NftablesConfig,
    where: str,
    versions: Sequence[int],
    udp_port: int | None,
    seed: int,
    exists: Callable[[str], bool],
) -> list[str]:
    """nft commands that make the pre-filter exactly as configured (or remove it), as one
    transaction. ``where``: "FAMILY TABLE"; ``exists("chain inet filter X")``: whether
    that object is in the kernel now."""
    wanted = rules(cfg, versions, udp_port, seed)
    shed = [UDP_CHAIN, *(f"{CHAIN}-{r}" for r in REASONS)]  # regular chains
    if not wanted:
        return [
            cmd
            for chain in (CHAIN, *shed)
            if exists(f"chain {where} {chain}")
            for cmd in (f"flush chain {where} {chain}", f"delete chain {where} {chain}")
        ]
    cmds = []
    for version in versions:
        cmds.append(
            f"add set {where} {PROVEN_SET}{version} {{ type "
            f"{'ipv4_addr' if version == 4 else 'ipv6_addr'}; flags timeout; }}"
        )
    for b in _buckets(cfg, versions):
        cmds.append(f"add set {where} {b.slots} {{ type mark; size {SLOTS}; flags dynamic; }}")
        cmds.append(f"flush set {where} {b.slots}")  # a new seed: start with full buckets
        cmds.append(
            f"add set {where} {b.top} {{ type {b.addr_type}; size {TOP_SIZE}; "
            f"flags dynamic,timeout; timeout {TOP_TIMEOUT}s; counter; }}"
        )
    cmds += [f"add counter {where} {counter_name(c)}" for c in COUNTERS]
    cmds.append(
        f"add chain {where} {CHAIN} {{ type filter hook prerouting priority raw; policy accept; }}"
    )
    for chain in shed:
        cmds.append(f"add chain {where} {chain}")
    for chain in (CHAIN, *shed):
        cmds.append(f"flush chain {where} {chain}")
    for chain in shed:
        if chain not in wanted:
            cmds.append(f"delete chain {where} {chain}")
    # The spare limit, made anew (``add`` alone would keep an old rate): nothing refers to
    # it after the flushes above.
    spare = cfg.prefilter_spare
    body = f"{{ rate {max(spare, 1)}/second burst {max(spare, 1)} packets }}"
    cmds += [f"add limit {where} {SPARE} {body}", f"delete limit {where} {SPARE}",
             f"add limit {where} {SPARE} {body}"]  # fmt: skip
    cmds += [f"delete set {where} {name}" for name in OLD_SETS if exists(f"set {where} {name}")]
    for chain, chain_rules in reversed(wanted.items()):  # jump targets first
        cmds += [f"add rule {where} {chain} {rule}" for rule in chain_rules]
    return cmds


def proven_element(addr: object, timeout: int) -> str:
    """A proven set's element for a lease of ``timeout`` seconds from ``addr``."""
    return f"{addr} timeout {max(timeout, PROVEN_TIMEOUT)}s"


# --- reading it back ---------------------------------------------------------------------------


def parse_counters(listing: str) -> dict[str, int]:
    """``nft -j list counters table F T`` -> our counters' packets by short name."""
    out: dict[str, int] = {}
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError, TypeError):
        return out
    prefix = counter_name("")
    for item in items if isinstance(items, list) else ():
        body = item.get("counter") if isinstance(item, dict) else None
        if isinstance(body, dict) and str(body.get("name", "")).startswith(prefix):
            name = str(body["name"])[len(prefix) :]
            if name in COUNTERS:
                out[name] = int(body.get("packets", 0))
    return out


def parse_top(listing: str) -> tuple[str, int] | None:
    """``nft -j list set F T fastknock_pf_top*`` -> (the key with the most packets, them)."""
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError, TypeError):
        return None
    best: tuple[str, int] | None = None
    for item in items if isinstance(items, list) else ():
        body = item.get("set") if isinstance(item, dict) else None
        for elem in body.get("elem", ()) if isinstance(body, dict) else ():
            inner = elem.get("elem") if isinstance(elem, dict) else None
            if not isinstance(inner, dict):
                continue
            packets = inner.get("counter", {}).get("packets", 0)
            if isinstance(inner.get("val"), str) and (best is None or packets > best[1]):
                best = (inner["val"], int(packets))
    return best


def top_prefix(reason: str, key: str, cfg: NftablesConfig) -> str:
    """The sampled key as a prefix: 10.0.0.1/32, 2001:db8:1:2::/64, 2001:db8:1::/48."""
    bits = {"ip4": 32, "ip6": cfg.prefilter_ipv6_prefix, "ip6group": cfg.prefilter_ipv6_group}
    return f"{key}/{bits[reason]}"


@dataclass
class Shedding:
    """Sans-I/O: fed the counters at each poll, says when the warning line is due (at
    most one each ``interval`` seconds) while the pre-filter drops datagrams for being over
    an allowance (and the spare)."""

    interval: float = 60.0
    last: dict[str, int] | None = None
    last_warning: float | None = None

    def update(self, counters: Mapping[str, int], now: float) -> tuple[str, int] | None:
        """(the reason with the most drops since the previous poll, how many), or None."""
        before, self.last = self.last, dict(counters)
        if before is None:
            return None  # the first poll: counters of earlier runs are no current flood
        new = {r: counters.get(f"dropped_{r}", 0) - before.get(f"dropped_{r}", 0) for r in REASONS}
        reason = max(REASONS, key=lambda r: new[r])
        if new[reason] <= 0:
            return None
        if self.last_warning is not None and now - self.last_warning < self.interval:
            return None
        self.last_warning = now
        return reason, new[reason]

    @staticmethod
    def line(reason: str, dropped: int, seconds: float, top: str | None) -> str:
        what = {"ip4": "per-address", "ip6": "per-IPv6-prefix", "ip6group": "per-IPv6-group"}
        src = f", top source {top}" if top else ""
        return (f"pre-filter shedding: {dropped} datagrams dropped in {seconds:.0f} s over "
                f"the {what[reason]} allowance and the spare (reason {reason}{src})")  # fmt: skip
