"""What fastknockfwd puts into the kernel: lease keys, changes, and their nft text forms.

Design
------
* A lease key is one kernel object: a ``PortLease`` is one set element (``SOURCE .
  PORT[-LAST]`` in the set of its protocol and family), a ``JumpLease`` one rule. Its
  ``addr`` is the knocker's exact address, or for a prefix open (``ipv4-prefix``/
  ``ipv6-prefix``, issue 15) the network of the knocker's /N (``source``): the kernel
  holds one element for a /24, whoever of the /24 knocked. A prefix of full length is
  the address itself, so a letmein-style lease is what it always was.
* A key is *wide* when its source is a network or its ports a range: it lives in the
  interval sets (``nft``); exact keys keep the hash sets.
* A ``Change`` is what one transaction does to one key: install (with the timeout the
  kernel should hold: the latest of its holders', ``holders``) or remove. ``proven`` are
  the knockers' exact addresses for the pre-filter's proven sets (never a prefix: the
  pre-filter exempts who proved a key, not their neighbours).
* Text forms: ``element`` (set element), ``jump_comment``/``parse_jump_comment`` (the rule
  comment carries the deadline, so a restart finds and expires jump leases), and
  ``parse_elements`` (nft JSON listing -> live leases; prefixes and ranges included).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from fastknock.addr import IPAddress
from fastknock.conf.model import Config, PortResource

__all__ = [
    "HOOKS",
    "JUMP_PREFIX",
    "Change",
    "IPNetwork",
    "JumpLease",
    "LeaseKey",
    "LiveLease",
    "PortLease",
    "Source",
    "jump_comment",
    "needs_ranges",
    "overlaps",
    "parse_elements",
    "parse_jump_comment",
    "port_text",
    "source",
]

JUMP_PREFIX = "fastknock:jump:"
HOOKS = ("input", "forward", "output")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Source = IPAddress | IPNetwork  # an exact address, or a prefix lease's network


def source(addr: IPAddress, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> Source:
    """What a knock from ``addr`` opens: the address, or its /N (host bits cleared)."""
    bits = ipv4_prefix if addr.version == 4 else ipv6_prefix
    if bits >= addr.max_prefixlen:
        return addr
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False)


def port_text(port: int, port_last: int | None) -> str:
    """``N``, or ``A-B`` for a range (nft's syntax, and FASTKNOCK_PORT's)."""
    return str(port) if port_last is None or port_last == port else f"{port}-{port_last}"


def needs_ranges(cfg: Config) -> list[int]:
    """The port resources whose leases are wide (a range, or a prefix shorter than the
    address): they need the interval sets. Jump prefixes are rules, they need none."""
    return sorted(
        r.id
        for r in cfg.resources.values()
        if isinstance(r, PortResource)
        and (r.port_last is not None or r.ipv4_prefix < 32 or r.ipv6_prefix < 128)
    )


def is_network(src: Source) -> bool:
    return isinstance(src, ipaddress.IPv4Network | ipaddress.IPv6Network)


@dataclass(frozen=True, slots=True)
class PortLease:
    addr: Source
    proto: str  # "tcp" | "udp"
    port: int
    port_last: int | None = None  # None: one port

    @property
    def wide(self) -> bool:
        """A prefix or a port range: the interval sets hold it."""
        return self.port_last is not None or is_network(self.addr)

    @property
    def ports(self) -> str:
        return port_text(self.port, self.port_last)

    def element(self) -> str:
        return f"{self.addr} . {self.ports}"


@dataclass(frozen=True, slots=True)
class JumpLease:
    resource: int
    hook: str  # "input" | "forward" | "output"
    target: str
    addr: Source | None  # None: no saddr match (shared by every knocker)


LeaseKey = PortLease | JumpLease


def _addrs_overlap(a: Source, b: Source) -> bool:
    if a.version != b.version:
        return False
    a_net, b_net = ipaddress.ip_network(a), ipaddress.ip_network(b)
    return a_net.overlaps(b_net)


def overlaps(a: LeaseKey, b: LeaseKey) -> bool:
    """Whether two leases open something in common: port leases of one protocol and family
    with common addresses and ports; jump leases of one resource and chain with common
    source addresses (an unmatched jump overlaps only itself)."""
    if isinstance(a, JumpLease) or isinstance(b, JumpLease):
        if not (isinstance(a, JumpLease) and isinstance(b, JumpLease)):
            return False
        if (a.resource, a.hook, a.target) != (b.resource, b.hook, b.target):
            return False
        if a.addr is None or b.addr is None:
            return a.addr is b.addr
        return _addrs_overlap(a.addr, b.addr)
    if a.proto != b.proto or not _addrs_overlap(a.addr, b.addr):
        return False
    a_last = a.port if a.port_last is None else a.port_last
    b_last = b.port if b.port_last is None else b.port_last
    return a.port <= b_last and b.port <= a_last


@dataclass(frozen=True, slots=True)
class Change:
    key: LeaseKey
    install: bool
    timeout: int = 0  # seconds; installs only
    # Exact knocker addresses and their own lease seconds, for the pre-filter's proven
    # sets; None: the key's own address if it is exact (callers without holders).
    proven: tuple[tuple[IPAddress, int], ...] | None = None

    def proven_sources(self) -> tuple[tuple[IPAddress, int], ...]:
        if not self.install:
            return ()
        if self.proven is not None:
            return self.proven
        addr = self.key.addr
        return () if addr is None or is_network(addr) else ((addr, self.timeout),)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class LiveLease:
    key: LeaseKey
    remaining: float | None  # seconds; None: no timeout (added by hand)


def jump_comment(lease: JumpLease, deadline: int) -> str:
    addr = "any" if lease.addr is None else str(lease.addr)
    return f"{JUMP_PREFIX}{lease.resource:08x}:{lease.hook}:{lease.target}:{addr}:{deadline}"


def parse_jump_comment(comment: str) -> tuple[JumpLease, float] | None:
    """Inverse of ``jump_comment``; None if ``comment`` is not one of ours."""
    if not comment.startswith(JUMP_PREFIX):
        return None
    try:
        res, hook, target, rest = comment[len(JUMP_PREFIX) :].split(":", 3)
        addr_text, deadline = rest.rsplit(":", 1)
        addr: Source | None = None
        if addr_text != "any":
            addr = _source_text(addr_text)
        if hook not in HOOKS:
            return None
        return JumpLease(int(res, 16), hook, target, addr), float(int(deadline))
    except ValueError:
        return None


def _source_text(text: str) -> Source:
    """``a.b.c.d`` or ``net/len`` (strict: host bits set is not one of ours)."""
    if "/" in text:
        net = ipaddress.ip_network(text)
        return net.network_address if net.prefixlen == net.max_prefixlen else net
    return ipaddress.ip_address(text)


def _source_json(val: Any) -> Source:
    if isinstance(val, dict) and isinstance(val.get("prefix"), dict):
        return _source_text(f"{val['prefix']['addr']}/{int(val['prefix']['len'])}")
    if isinstance(val, str):
        return ipaddress.ip_address(val)
    raise ValueError("not an address")


def _ports_json(val: Any) -> tuple[int, int | None]:
    if isinstance(val, dict) and isinstance(val.get("range"), list):
        first, last = (int(v) for v in val["range"])
        return first, (last if last != first else None)
    return int(val), None


def parse_elements(elems: Any, proto: str) -> list[LiveLease]:
    """The elements of one of our sets in nft's JSON listing, as live leases (anything
    else, e.g. an address range added by hand, is skipped)."""
    leases = []
    for item in elems if isinstance(elems, list) else ():
        remaining: float | None = None
        val = item
        if isinstance(item, dict) and "elem" in item:
            body = item["elem"]
            val = body.get("val")
            if "expires" in body:
                remaining = float(body["expires"])
            elif "timeout" in body:
                remaining = float(body["timeout"])
        try:
            addr_val, port_val = val["concat"]
            first, last = _ports_json(port_val)
            key = PortLease(_source_json(addr_val), proto, first, last)
        except (TypeError, KeyError, ValueError):
            continue
        leases.append(LiveLease(key, remaining))
    return leases
