"""The ``[RESOURCES]`` section: port and jump resources, parsed to ``model`` types.

Design
------
* A mixin of checks over ``lexer.Checker`` (``ResourceParser``), so ``config._Parser``
  keeps one ``fail``/``uint`` and one source name; this module owns the meaning of each
  resource attribute and nothing else. letmein's own reader (letmein-conf, 12.x) decides
  where PROTOCOL.md is silent; every letmein resource line loads with the same meaning.
* fastknock extensions (issue 15; letmein refuses them, so no letmein file changes
  meaning):

  - ``port: A-B`` opens the inclusive range A..B (``PortResource.port``/``port_last``).
    Both ends 1..65535, A < B; ``A-A`` is the single port A (stored as one port, so it
    uses the exact-address kernel sets). Reversed, half-empty or out-of-range ranges are
    errors. On the server a range that includes the control port ([GENERAL] port, any
    protocol: the rule ``model.admit`` applies) is an error too, checked once the whole
    file is read (sections may come in any order). A *single* port equal to the control
    port still loads (letmein accepts it; ``admit`` refuses it at knock time).
  - ``ipv4-prefix: N`` (1..32) and ``ipv6-prefix: N`` (1..128): a knock opens the
    knocker's /N. On a jump resource only with at least one ``*-match: saddr`` (a jump
    without one matches every source already, so a prefix there is a mistake): an error
    otherwise.
* Two port resources must not share a port of one protocol (letmein refuses any shared
  number; fastknock allows tcp on one and udp on the other). With ranges the check is a
  sort-and-sweep per protocol, O(n log n) (a 1 MiB file holds ~40 000 resources); the
  message names the first shared port, the later resource (file order) and the earlier.
"""

from __future__ import annotations

from fastknock.conf.lexer import (
    U32_MAX,
    Checker,
    Item,
    RawOption,
    RawSection,
    hex_id,
    lower_word,
    show,
    split_items,
    strip,
)
from fastknock.conf.model import JumpResource, PortResource, Resource

__all__ = ["CHAINS", "ResourceParser", "protocols"]

CHAINS = ("input", "forward", "output")
_PREFIXES = (("ipv4-prefix", 32), ("ipv6-prefix", 128))


def protocols(values: list[str]) -> tuple[bool, bool, str | None]:
    """The tcp/udp flags named by ``values`` (any case), and the first other word, if any."""
    tcp = udp = False
    for value in values:
        proto = lower_word(value)
        if proto == "tcp":
            tcp = True
        elif proto == "udp":
            udp = True
        else:
            return tcp, udp, value
    return tcp, udp, None


class ResourceParser(Checker):
    """``[RESOURCES]``; ``resource_lines`` learns each resource's line (for later checks)."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.resource_lines: dict[int, int] = {}

    def resources(self, sect: RawSection) -> dict[int, Resource]:
        lines = self.resource_lines
        found = self.ids(
            sect, "[RESOURCES] bad resource id", "[RESOURCES] duplicate resource", lines
        )
        out = {rid: self.resource(rid, opt) for rid, opt in found}
        self.check_ports(out)
        return out

    def resource(self, rid: int, opt: RawOption) -> Resource:
        where = f"[RESOURCES] resource {hex_id(rid)}"
        items = split_items(opt, self.source, where)
        heads = [
            it.key if it.key is not None else (it.values[0] if len(it.values) == 1 else None)
            for it in items
        ]
        is_port, is_jump = "port" in heads, "jump" in heads
        if is_port == is_jump:
            self.fail(
                f"{where}: must be either 'port: N ...' or 'jump / input: CHAIN ...'", opt.line
            )
        return self.port_resource(rid, where, items) if is_port else self.jump(rid, where, items)

    def port_resource(self, rid: int, where: str, items: list[Item]) -> PortResource:
        ports: tuple[int, int | None] | None = None
        tcp = udp = False
        kw: dict[str, object] = {}
        for it in items:
            if it.key is None:
                t, u, bad = protocols(it.values)
                if bad is not None:
                    self.fail(f"{where}: unknown attribute {show(bad)}", it.line)
                tcp, udp = tcp or t, udp or u
            elif it.key == "port":
                if ports is not None:
                    self.fail(f"{where}: more than one 'port:'", it.line)
                if len(it.values) != 1:
                    self.fail(f"{where}: 'port:' takes one number or one range A-B", it.line)
                ports = self.port_spec(it.values[0], f"{where} port", it.line)
            else:
                self.common(where, it, kw)
        assert ports is not None  # "port" was among the item heads
        if not (tcp or udp):
            tcp = True
        return PortResource(rid, ports[0], tcp, udp, port_last=ports[1], **kw)  # type: ignore[arg-type]

    def port_spec(self, value: str, what: str, line: int) -> tuple[int, int | None]:
        """``N`` -> (N, None); ``A-B`` -> (A, B) with A < B (``A-A`` is the port A)."""
        text = strip(value)
        if "-" not in text:
            return self.uint(text, what, line, 1, 0xFFFF), None
        first_text, _, last_text = (strip(s) for s in text.partition("-"))
        if not first_text or not last_text:
            self.fail(
                f"{what}: range {show(text)} lacks a port (expected A-B, e.g. 60000-61000)", line
            )
        first = self.uint(first_text, f"{what} range start", line, 1, 0xFFFF)
        last = self.uint(last_text, f"{what} range end", line, 1, 0xFFFF)
        if last < first:
            self.fail(f"{what}: range {first}-{last} is reversed (expected A-B with A <= B)", line)
        return first, (last if last > first else None)

    def jump(self, rid: int, where: str, items: list[Item]) -> JumpResource:
        kw: dict[str, object] = {}
        match_lines: dict[str, int] = {}
        seen_jump = False
        for it in items:
            key = it.key
            if key is None:
                if it.values != ["jump"]:
                    self.fail(f"{where}: unknown attribute {show(', '.join(it.values))}", it.line)
                if seen_jump:
                    self.fail(f"{where}: 'jump' given twice", it.line)
                seen_jump = True
            elif key in CHAINS:
                if key in kw:
                    self.fail(f"{where}: more than one '{key}:'", it.line)
                if len(it.values) != 1:
                    self.fail(f"{where}: '{key}:' takes one chain name", it.line)
                kw[key] = self.name(it.values[0], f"{where} {key}", it.line)
            elif key.endswith("-match") and key[: -len("-match")] in CHAINS:
                chain = key[: -len("-match")]
                if chain in match_lines:
                    self.fail(f"{where}: more than one '{key}:'", it.line)
                if it.values != ["saddr"]:
                    self.fail(f"{where}: '{key}:' must be 'saddr'", it.line)
                match_lines[chain] = it.line
                kw[f"{chain}_match_saddr"] = True
            elif key == "jump":
                self.fail(f"{where}: 'jump' takes no value", it.line)
            else:
                self.common(where, it, kw)
        if not any(chain in kw for chain in CHAINS):
            self.fail(
                f"{where}: a jump resource needs 'input:', 'forward:' or 'output:'", items[0].line
            )
        for chain, line in match_lines.items():
            if chain not in kw:
                self.fail(f"{where}: '{chain}-match:' without '{chain}:'", line)
        for it in items:
            if it.key in ("ipv4-prefix", "ipv6-prefix") and not match_lines:
                self.fail(
                    f"{where}: '{it.key}:' needs an 'input-match: saddr' (or forward-/output-"
                    "match): without one the jump matches every source",
                    it.line,
                )
        return JumpResource(rid, **kw)  # type: ignore[arg-type]

    def common(self, where: str, it: Item, kw: dict[str, object]) -> None:
        """``users:``, ``timeout:``, ``ipv4-prefix:`` and ``ipv6-prefix:`` (both kinds)."""
        key = it.key or ""
        if key not in ("users", "timeout", "ipv4-prefix", "ipv6-prefix"):
            self.fail(f"{where}: unknown attribute {show(key)}", it.line)
        field = key.replace("-", "_")
        if field in kw:
            self.fail(f"{where}: more than one '{key}:'", it.line)
        if key == "users":
            kw["users"] = frozenset(self.id(v, f"{where} users", it.line) for v in it.values)
            return
        if len(it.values) != 1:
            self.fail(f"{where}: '{key}:' takes one number", it.line)
        hi = dict(_PREFIXES).get(key, U32_MAX)
        kw[field] = self.uint(it.values[0], f"{where} {key}", it.line, 1, hi)

    def check_ports(self, resources: dict[int, Resource]) -> None:
        """No port of one protocol in two resources (ranges included)."""
        order = {rid: i for i, rid in enumerate(resources)}
        best: tuple[int, int, int, int, str] | None = None  # later's order, later, port, earlier
        for proto in ("tcp", "udp"):
            spans = sorted(
                (r.ports.start, order[rid], r.ports.stop - 1, rid)
                for rid, r in resources.items()
                if isinstance(r, PortResource) and (r.tcp if proto == "tcp" else r.udp)
            )
            reach: tuple[int, int, int] | None = None  # (last port, order, rid): farthest so far
            for start, idx, last, rid in spans:
                if reach is not None and start <= reach[0]:
                    pair = sorted([(idx, rid), (reach[1], reach[2])])
                    if best is None or pair[1][0] < best[0]:
                        best = (pair[1][0], pair[1][1], start, pair[0][1], proto)
                if reach is None or last > reach[0]:
                    reach = (last, idx, rid)
        if best is not None:
            _, later, port, earlier, proto = best
            self.fail(
                f"[RESOURCES] resource {hex_id(later)}: port {port}/{proto} is already "
                f"opened by resource {hex_id(earlier)} (line {self.resource_lines[earlier]})",
                self.resource_lines[later],
            )

    def check_control_port(self, resources: dict[int, Resource], control_port: int) -> None:
        """(Server) no port range that includes the control port."""
        for rid, res in resources.items():
            if (
                isinstance(res, PortResource)
                and res.port_last is not None
                and control_port in res.ports
            ):
                self.fail(
                    f"[RESOURCES] resource {hex_id(rid)}: port range {res.port}-{res.port_last} "
                    f"includes the control port {control_port} ([GENERAL] port)",
                    self.resource_lines[rid],
                )
