"""The nftables layer of fastknockfwd: the lease representation, the ruleset, transactions.

Representation
--------------
*Port leases live in named kernel sets, not in rules.* In the configured family/table the
daemon keeps (creating them if missing) four sets with ``flags timeout``::

    fastknock_tcp4, fastknock_udp4   type ipv4_addr . inet_service   (family inet or ip)
    fastknock_tcp6, fastknock_udp6   type ipv6_addr . inet_service   (family inet or ip6)

and one static rule per set in ``chain-input``, e.g.
``ip saddr . tcp dport @fastknock_tcp4 accept comment "fastknock:tcp4"``, plus the
control-port rules (``tcp dport 5800 accept comment "fastknock:control-tcp:5800"``), as
letmein opens its control port. A knock adds the element ``ADDR . PORT timeout Ns``; the
kernel expires it, so leases need no daemon-side timer and survive daemon restarts. A
re-knock refreshes the timeout with ``add; delete; add`` in one transaction (portable: an
``add`` of an existing element does not refresh its timeout on every kernel, and a bare
``delete`` of a missing element fails the transaction). A revoke is ``add; delete``, so a
revoke of a lease that does not exist succeeds (ACK): the requested end state holds.
Many leases are one set lookup per packet instead of a linear rule list, and a batch of
N leases is three commands per set, whatever N is.

*Prefix leases and port ranges* (``ipv4-prefix``/``ipv6-prefix``, ``port: A-B``; issue 15)
live in four more sets, ``fastknock_{tcp,udp}{4,6}_ranges``, same types with ``flags
interval, timeout`` (concatenated ranges), e.g. ``10.1.2.0/24 . 60000-61000 timeout
600s``, each with its static rule (``fastknock:tcp4_ranges``). Separate sets, not one
kind for all, because the kernel's interval set (pipapo) copies its whole lookup table on
every transaction that touches it: ``bench/bench_interval_sets.py`` (Linux 6.18, nft
1.0.6, libnftables, median of 50 one-lease transactions) measured 0.18-0.24 ms for a hash
set at 0, 1000 or 10000 live elements, vs 0.34 / 3.5 / 33 ms for an interval set of
prefixes (0.37 / 6.0 / 49 ms with port ranges); exact leases (every letmein lease) keep
the hash sets. The interval sets are created only when the config has such a
resource (``leases.needs_ranges``), in a transaction of their own: a kernel or nft that
refuses them stops set-up with an error saying so (never a narrower or wider lease), and
an upgrade without such resources changes nothing in the ruleset. Once they exist they
stay served (a reload that drops the resources leaves their leases to expire). An
interval set refuses an element that overlaps a live one, so removals from it go first
in the transaction (``commands``), and the daemon removes an element whose shape a reload
changed before it adds the new shape (``holders.Draft``). The pre-filter's proven sets
always get the knockers' exact addresses, never a prefix.

*Jump leases are per-lease rules with a daemon-tracked expiry*, like letmein's:
``[ip|ip6 saddr ADDR] jump TARGET comment "fastknock:jump:RES:HOOK:ADDR|any:DEADLINE"``
in chain-input/-forward/-output (``*-match: saddr`` matches the knocking address in
every chain, letmein's rendering, or its network with a prefix: ``ip saddr 10.1.2.0/24``;
without it the rule is shared by all knockers). A set
cannot express the unmatched ``jump`` (no packet key to look up), and jump resources are
rare, so one simple mechanism serves both cases. DEADLINE is a Unix time, so a restarted
daemon finds the rules, counts them and removes them when they are due. While the daemon
is stopped, jump leases do not expire; port leases do.

*Pre-filter*: with a UDP control port, the daemon also keeps its own base chain
``fastknock-prefilter`` (``prefilter.py``: wrong sizes and per-source floods dropped at
prerouting, before conntrack). Every lease install also puts the knocking address into
``fastknock_proven4/6`` (same transaction, same add/delete/add refresh), which the
pre-filter lets through before its per-source buckets.

Static rules are found by their ``fastknock:`` comment, so restarts never duplicate them;
rules without that comment are never touched. The daemon never flushes anything.

Flushing leases (admin): ``nft flush set inet filter fastknock_tcp4`` (and the other three
sets, and the ``_ranges`` ones if present) drops every port lease at once; jump leases are
removed with ``nft -a list chain inet filter LETMEIN-INPUT`` and ``nft delete rule ...
handle N`` for rules whose comment starts with ``fastknock:jump:`` (or flush the chain: a
running daemon re-creates its static rules at its next start). ``fastknockfwd --list``
shows the leases.

The lease types and their text forms are ``leases``; who holds which kernel object (and
so what a revoke may remove) is fastknockfwd's, ``holders``. The runners (libnftables
in-process, or the ``nft`` executable) are ``runner``; one ``Runner.run`` call is one
nftables transaction.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastknock.conf.config import NftablesConfig
from fastknock.errors import FirewallError
from fastknock.firewall import prefilter
from fastknock.firewall.leases import (
    JUMP_PREFIX,
    Change,
    JumpLease,
    LiveLease,
    PortLease,
    Source,
    jump_comment,
    parse_elements,
    parse_jump_comment,
)
from fastknock.firewall.runner import Runner

__all__ = [
    "COMMENT_PREFIX",
    "RANGES_SUFFIX",
    "SET_PREFIX",
    "Firewall",
    "Stats",
]

SET_PREFIX = "fastknock_"
RANGES_SUFFIX = "_ranges"
COMMENT_PREFIX = "fastknock:"
_NAME_RE = re.compile(r"^[A-Za-z_.][A-Za-z0-9/_.-]{0,255}$")


@dataclass
class Stats:
    transactions: int = 0  # nftables transactions run for lease changes
    changes: int = 0  # lease changes submitted
    failed_transactions: int = 0
    fallbacks: int = 0  # failed batches re-applied one by one


def _ipfam(addr: Source) -> str:
    return "ip" if addr.version == 4 else "ip6"


class Firewall:
    """Lease operations on one configured nftables family/table. Not async, not threaded:
    the daemon serialises calls (one worker thread)."""

    def __init__(
        self,
        cfg: NftablesConfig,
        runner: Runner,
        control_port: int | None = None,
        control_tcp: bool = True,
        control_udp: bool = False,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        ranges: bool = False,
    ) -> None:
        """``ranges``: the config has port ranges or prefix opens (``needs_ranges``): the
        interval sets must exist, or ``setup`` fails saying why."""
        if cfg.family not in ("inet", "ip", "ip6"):
            raise FirewallError(f"unknown nftables family {cfg.family!r}")
        for name in (cfg.table, cfg.chain_input, cfg.chain_forward, cfg.chain_output):
            if name is not None and not _NAME_RE.match(name):
                raise FirewallError(f"unsupported nftables name {name!r}")
        self.cfg = cfg
        self.runner = runner
        self.clock = clock
        self.stats = Stats()
        self.versions = {"inet": (4, 6), "ip": (4,), "ip6": (6,)}[cfg.family]
        self.chains = {"input": cfg.chain_input, "forward": cfg.chain_forward}
        self.chains["output"] = cfg.chain_output
        self.control = [
            (proto, control_port)
            for proto, on in (("tcp", control_tcp), ("udp", control_udp))
            if on and control_port
        ]
        self._where = f"{cfg.family} {cfg.table}"
        # The pre-filter's hash seed: secret, new at each start (and reload).
        self.seed = secrets.randbits(32) if seed is None else seed
        self.prefilter = prefilter.active(cfg, self._udp_control_port())
        self.needs_ranges = ranges
        self.ranges = ranges  # the interval sets are in use (also: found from before)

    # -- names --

    def set_name(self, proto: str, version: int, wide: bool = False) -> str:
        return f"{SET_PREFIX}{proto}{version}{RANGES_SUFFIX if wide else ''}"

    def lease_sets(self) -> list[tuple[str, str, int, bool]]:
        """(name, proto, version, wide) of every lease set in use."""
        return [
            (self.set_name(proto, version, wide), proto, version, wide)
            for wide in ((False, True) if self.ranges else (False,))
            for version in self.versions
            for proto in ("tcp", "udp")
        ]

    def supports(self, addr: Source) -> bool:
        return addr.version in self.versions

    # -- start-up --

    def require_chains(self) -> None:
        """Raise FirewallError naming the table or configured chain that is missing."""
        for hook, chain in self.chains.items():
            if chain is None:
                continue
            try:
                self.runner.run(f"list chain {self._where} {chain}")
            except FirewallError as exc:
                if not self._exists(f"table {self._where}"):
                    raise FirewallError(f"nftables table {self._where} is missing") from exc
                raise FirewallError(
                    f"nftables chain {self._where} {chain} (chain-{hook}) is missing: {exc}"
                ) from exc

    def static_rules(self) -> dict[str, str]:
        """Comment -> rule text of every static rule the daemon keeps in chain-input."""
        rules: dict[str, str] = {}
        for proto, port in self.control:
            rules[f"{COMMENT_PREFIX}control-{proto}:{port}"] = f"{proto} dport {port} accept"
        for name, proto, version, wide in self.lease_sets():
            ipf = "ip" if version == 4 else "ip6"
            tag = f"{proto}{version}{RANGES_SUFFIX if wide else ''}"
            rules[f"{COMMENT_PREFIX}{tag}"] = f"{ipf} saddr . {proto} dport @{name} accept"
        return rules

    def _udp_control_port(self) -> int | None:
        return next((port for proto, port in self.control if proto == "udp"), None)

    def prefilter_rules(self) -> dict[str, list[str]]:
        """The pre-filter's chains and their rules (``prefilter.rules``)."""
        return prefilter.rules(self.cfg, self.versions, self._udp_control_port(), self.seed)

    def setup(self) -> None:
        """Create missing sets and static rules; drop stale or duplicated own static rules;
        put the pre-filter in place (or remove it)."""
        self.require_chains()
        self._setup_ranges()
        cmds = []
        for name, _proto, version, wide in self.lease_sets():
            typ = "ipv4_addr" if version == 4 else "ipv6_addr"
            flags = "interval, timeout" if wide else "timeout"
            cmds.append(
                f"add set {self._where} {name} {{ type {typ} . inet_service; flags {flags}; }}"
            )
        wanted = self.static_rules()
        seen: set[str] = set()
        chain = self.cfg.chain_input
        cmds += prefilter.commands(
            self.cfg,
            self._where,
            self.versions,
            self._udp_control_port(),
            self.seed,
            self._exists,
        )
        for comment, handle in self._own_rules(chain):
            if comment.startswith(JUMP_PREFIX):
                continue
            if comment in wanted and comment not in seen:
                seen.add(comment)
            else:
                cmds.append(f"delete rule {self._where} {chain} handle {handle}")
        for comment, rule in wanted.items():
            if comment not in seen:
                cmds.append(f'add rule {self._where} {chain} {rule} comment "{comment}"')
        self.runner.run("\n".join(cmds))

    def detect_ranges(self) -> bool:
        """Whether the interval sets exist (from this config or an earlier one); from now
        on ``scan`` reads them and ``setup`` keeps their rules."""
        name = self.set_name("tcp", self.versions[0], True)
        self.ranges = self.needs_ranges or self._exists(f"set {self._where} {name}")
        return self.ranges

    def _setup_ranges(self) -> None:
        """Create the interval sets if the config needs them (one transaction of their own,
        so a kernel without them is named as the cause); keep serving them if they exist
        from an earlier config (their leases stay until they expire)."""
        if not self.needs_ranges:
            self.detect_ranges()
            return
        cmds = []
        for version in self.versions:
            typ = "ipv4_addr" if version == 4 else "ipv6_addr"
            for proto in ("tcp", "udp"):
                cmds.append(
                    f"add set {self._where} {self.set_name(proto, version, True)} "
                    f"{{ type {typ} . inet_service; flags interval, timeout; }}"
                )
        try:
            self.runner.run("\n".join(cmds))
        except FirewallError as exc:
            raise FirewallError(
                "this kernel or nft cannot hold port ranges or prefix leases (ipv4-prefix, "
                "ipv6-prefix, port: A-B in [RESOURCES]): it refused a set with 'flags "
                "interval, timeout' over 'ADDRESS . inet_service' (concatenated ranges need "
                f"Linux 5.6 and nft 0.9.4 or later). Remove those attributes or upgrade. ({exc})"
            ) from exc
        self.ranges = True

    # -- reading the kernel --

    def prefilter_counters(self) -> dict[str, int]:
        """The pre-filter's named counters (packets by ``prefilter.COUNTERS`` name); empty
        without a pre-filter."""
        if not self.prefilter:
            return {}
        return prefilter.parse_counters(
            self.runner.run(f"list counters table {self._where}", json_output=True)
        )

    def prefilter_top(self, reason: str) -> str | None:
        """The sampled source prefix that the pre-filter dropped most for ``reason``."""
        name = prefilter.top_set(reason)
        found = prefilter.parse_top(self.runner.run(f"list set {self._where} {name}", True))
        return None if found is None else prefilter.top_prefix(reason, found[0], self.cfg)

    def _json(self, command: str) -> list[dict[str, Any]]:
        out = self.runner.run(command, json_output=True)
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FirewallError(f"cannot parse nft JSON output of {command!r}") from exc
        return [item for item in items if isinstance(item, dict)]

    def _exists(self, what: str) -> bool:
        try:
            self.runner.run(f"list {what}")
            return True
        except FirewallError:
            return False

    def _own_rules(self, chain: str) -> list[tuple[str, int]]:
        """(comment, handle) of the rules with a fastknock comment in ``chain``."""
        found = []
        for item in self._json(f"list chain {self._where} {chain}"):
            rule = item.get("rule")
            if isinstance(rule, dict):
                comment = rule.get("comment")
                if isinstance(comment, str) and comment.startswith(COMMENT_PREFIX):
                    found.append((comment, int(rule["handle"])))
        return found

    def scan(self) -> list[LiveLease]:
        """Every live lease in the kernel: set elements and per-lease jump rules."""
        leases: list[LiveLease] = []
        for name, proto, _version, _wide in self.lease_sets():
            try:
                items = self._json(f"list set {self._where} {name}")
            except FirewallError:
                if self._exists(f"set {self._where} {name}"):
                    raise
                continue  # not created yet (the daemon never ran, no ranges): no leases
            for item in items:
                body = item.get("set")
                if isinstance(body, dict):
                    leases.extend(parse_elements(body.get("elem", ()), proto))
        now = self.clock()
        for lease, deadline in self._jump_rules().values():
            leases.append(LiveLease(lease, max(0.0, deadline - now)))
        return leases

    def _jump_rules(self) -> dict[str, tuple[JumpLease, float]]:
        """Jump lease rules by '<chain> handle <n>'."""
        rules = {}
        for hook, chain in self.chains.items():
            if chain is None:
                continue
            for comment, handle in self._own_rules(chain):
                parsed = parse_jump_comment(comment)
                if parsed is not None and parsed[0].hook == hook:
                    rules[f"{chain} handle {handle}"] = parsed
        return rules

    # -- changing the kernel --

    def apply(self, changes: list[Change]) -> list[str | None]:
        """Apply ``changes`` (one per lease key) as one transaction. Returns, per change,
        None or the error. If the transaction fails, each change is retried alone."""
        self.stats.changes += len(changes)
        if not changes:
            return []
        handles = self._handles(changes)
        try:
            self._transact(changes, handles)
            return [None] * len(changes)
        except FirewallError as exc:
            if len(changes) == 1:
                return [str(exc)]
        self.stats.fallbacks += 1
        results: list[str | None] = []
        for change in changes:
            try:
                self._transact([change], handles)
                results.append(None)
            except FirewallError as exc:
                results.append(str(exc))
        return results

    def _handles(self, changes: list[Change]) -> dict[JumpLease, list[str]]:
        handles: dict[JumpLease, list[str]] = {}
        if any(isinstance(c.key, JumpLease) for c in changes):
            for ref, (lease, _deadline) in self._jump_rules().items():
                handles.setdefault(lease, []).append(ref)
        return handles

    def _transact(self, changes: list[Change], handles: dict[JumpLease, list[str]]) -> None:
        cmds = self.commands(changes, handles)
        if not cmds:
            return
        self.stats.transactions += 1
        try:
            self.runner.run("\n".join(cmds))
        except FirewallError:
            self.stats.failed_transactions += 1
            raise

    def commands(self, changes: Iterable[Change], handles: dict[JumpLease, list[str]]) -> list[str]:
        """The nft commands for ``changes``: three per touched set (two more for removals
        from an interval set), plus the jump rules."""
        changes = list(changes)
        gone: dict[str, list[str]] = {}  # interval sets: elements removed
        touched: dict[str, list[str]] = {}
        fresh: dict[str, list[str]] = {}
        jumps: list[str] = []
        now = self.clock()
        for change in changes:
            key = change.key
            if isinstance(key, PortLease):
                if not self.supports(key.addr):
                    raise FirewallError(f"{key.addr} is not in nftables family {self.cfg.family}")
                if key.wide and not self.ranges:
                    raise FirewallError(f"no interval sets for the range/prefix lease {key}")
                name = self.set_name(key.proto, key.addr.version, key.wide)
                elem = key.element()
                if key.wide and not change.install:  # removals first (see the header)
                    gone.setdefault(name, []).append(elem)
                    continue
                touched.setdefault(name, []).append(elem)
                if change.install:
                    fresh.setdefault(name, []).append(f"{elem} timeout {change.timeout}s")
                continue
            chain = self.chains[key.hook]
            if chain is None:
                raise FirewallError(f"no chain-{key.hook} configured for jump {key.target}")
            for ref in handles.get(key, ()):
                jumps.append(f"delete rule {self._where} {ref}")
            if change.install:
                comment = jump_comment(key, int(now + change.timeout + 0.999))
                match = "" if key.addr is None else f"{_ipfam(key.addr)} saddr {key.addr} "
                jumps.append(
                    f'add rule {self._where} {chain} {match}jump {key.target} comment "{comment}"'
                )
        for change in changes if self.prefilter else ():  # proven sources pass first
            for addr, seconds in change.proven_sources():  # exact knockers, never a prefix
                name = f"{prefilter.PROVEN_SET}{addr.version}"
                touched.setdefault(name, [])
                if str(addr) not in touched[name]:
                    touched[name].append(str(addr))
                    fresh.setdefault(name, []).append(prefilter.proven_element(addr, seconds))
        cmds = []
        for name, elems in gone.items():  # an interval set refuses an overlapping add
            cmds.append(f"add element {self._where} {name} {{ {', '.join(elems)} }}")
            cmds.append(f"delete element {self._where} {name} {{ {', '.join(elems)} }}")
        for name, elems in touched.items():
            # add (no-op if present) + delete: works whether or not the element exists.
            cmds.append(f"add element {self._where} {name} {{ {', '.join(elems)} }}")
            cmds.append(f"delete element {self._where} {name} {{ {', '.join(elems)} }}")
            if name in fresh:
                cmds.append(f"add element {self._where} {name} {{ {', '.join(fresh[name])} }}")
        return cmds + jumps
