"""The pre-filter's nftables chain (``fastknock.firewall.prefilter``): generation and placement.

Pure command generation first; then ``Firewall.setup`` on the real kernel in a namespace
this module creates (skipped without root/nft/ip, failing instead when $CI is set). The
traffic tests are in test_prefilter_e2e.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Iterator

import pytest

from fastknock.conf.config import NftablesConfig
from fastknock.firewall import prefilter
from fastknock.firewall.leases import Change, PortLease
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables
from tests import netns

CFG = NftablesConfig(chain_input="LETMEIN-INPUT")
WHERE = "inet filter"
MATCH = "udp dport 5800 fib daddr type local"
SEED = 0x1234ABCD
LIMIT = "limit rate over 100/second burst 200 packets"


def nothing_exists(_: str) -> bool:
    return False


def test_rules_inet_defaults() -> None:
    chains = prefilter.rules(CFG, (4, 6), 5800, SEED)
    assert list(chains) == [
        "fastknock-prefilter",
        "fastknock-prefilter-udp",
        "fastknock-prefilter-ip4",
        "fastknock-prefilter-ip6",
        "fastknock-prefilter-ip6group",
    ]
    assert chains["fastknock-prefilter"] == [f"{MATCH} jump fastknock-prefilter-udp"]
    assert chains["fastknock-prefilter-udp"] == [
        'udp length != 64 counter name "fastknock_pf_dropped_size" drop',
        'ip saddr @fastknock_proven4 counter name "fastknock_pf_proven" accept',
        'ip6 saddr @fastknock_proven6 counter name "fastknock_pf_proven" accept',
        f"update @fastknock_pf_slots4 {{ jhash ip saddr mod 65536 seed 0x1234abcd "
        f"{LIMIT} }} jump fastknock-prefilter-ip4",
        f"update @fastknock_pf_slots6 {{ jhash ip6 saddr & ffff:ffff:ffff:ffff:: "
        f"mod 65536 seed 0x1234abcd {LIMIT} }} jump fastknock-prefilter-ip6",
        "update @fastknock_pf_slots6g { jhash ip6 saddr & ffff:ffff:ffff:: "
        "mod 65536 seed 0x1234abcd limit rate over 1600/second burst 3200 packets }"
        " jump fastknock-prefilter-ip6group",
    ]
    assert chains["fastknock-prefilter-ip4"] == [
        'limit name "fastknock_pf_spare" counter name "fastknock_pf_spared_ip4" accept',
        "add @fastknock_pf_top4 { ip saddr counter }",
        'counter name "fastknock_pf_dropped_ip4" drop',
    ]
    assert chains["fastknock-prefilter-ip6group"][1] == (
        "add @fastknock_pf_top6g { ip6 saddr & ffff:ffff:ffff:: counter }"
    )


def test_rules_follow_the_family_and_options() -> None:
    cfg = dataclasses.replace(
        CFG, prefilter_rate=7, prefilter_burst=9, prefilter_ipv6_prefix=56, prefilter_ipv6_group=40
    )
    chains = prefilter.rules(cfg, (6,), 5900, SEED)
    assert chains["fastknock-prefilter"] == [
        "udp dport 5900 fib daddr type local jump fastknock-prefilter-udp"
    ]
    main = chains["fastknock-prefilter-udp"]
    assert main[0].startswith("udp length != 64 ")
    assert not any("ip saddr" in r for r in main) and "fastknock-prefilter-ip4" not in chains
    assert "jhash ip6 saddr & ffff:ffff:ffff:ff00:: mod 65536" in main[2]
    assert "limit rate over 7/second burst 9 packets" in main[2]
    assert "& ffff:ffff:ff00:: mod" in main[3] and "over 112/second burst 144 packets" in main[3]
    # No group above the host prefix; /128: the whole address.
    full = dataclasses.replace(CFG, prefilter_ipv6_prefix=128, prefilter_ipv6_group=128)
    chains = prefilter.rules(full, (6,), 1, SEED)
    assert "fastknock-prefilter-ip6group" not in chains
    assert "{ jhash ip6 saddr mod 65536" in chains["fastknock-prefilter-udp"][2]
    # A new seed is a new hash of every source.
    assert prefilter.rules(CFG, (4,), 1, 7) != prefilter.rules(CFG, (4,), 1, 8)


def test_spare_zero_drops_everything_over_the_allowance() -> None:
    chains = prefilter.rules(dataclasses.replace(CFG, prefilter_spare=0), (4,), 5800, SEED)
    assert chains["fastknock-prefilter-ip4"] == [
        "add @fastknock_pf_top4 { ip saddr counter }",
        'counter name "fastknock_pf_dropped_ip4" drop',
    ]


def test_no_rules_when_off_or_without_udp_control_port() -> None:
    off = dataclasses.replace(CFG, prefilter=False)
    assert prefilter.rules(off, (4, 6), 5800, SEED) == {}
    assert prefilter.rules(CFG, (4, 6), None, SEED) == {}
    assert prefilter.commands(off, WHERE, (4, 6), 5800, SEED, nothing_exists) == []
    present = {f"chain inet filter fastknock-prefilter{c}" for c in ("", "-udp", "-ip4")}
    assert prefilter.commands(CFG, WHERE, (4, 6), None, SEED, present.__contains__) == [
        "flush chain inet filter fastknock-prefilter",
        "delete chain inet filter fastknock-prefilter",
        "flush chain inet filter fastknock-prefilter-udp",
        "delete chain inet filter fastknock-prefilter-udp",
        "flush chain inet filter fastknock-prefilter-ip4",
        "delete chain inet filter fastknock-prefilter-ip4",
    ]


def test_commands_build_everything_in_one_transaction() -> None:
    old = "set inet filter fastknock_prefilter4"
    cmds = prefilter.commands(CFG, WHERE, (4,), 5800, SEED, {old}.__contains__)
    text = "\n".join(cmds)
    assert "add set inet filter fastknock_proven4 { type ipv4_addr; flags timeout; }" in cmds
    assert (
        "add set inet filter fastknock_pf_slots4 { type mark; size 65536; flags dynamic; }" in cmds
    )
    assert "flush set inet filter fastknock_pf_slots4" in cmds  # new seed: fresh buckets
    assert "size 256; flags dynamic,timeout; timeout 60s; counter; }" in text
    assert "add counter inet filter fastknock_pf_dropped_ip4" in cmds
    assert "fastknock_pf_slots6" not in text  # family ip: no IPv6 sets
    # The old, fillable per-address set goes; the spare limit is made anew (its rate may
    # have changed) after the chains that use it were flushed; rules come last, the base
    # chain's after the chains it jumps to.
    assert f"delete {old}" in cmds
    spare = "add limit inet filter fastknock_pf_spare { rate 20000/second burst 20000 packets }"
    i = cmds.index(spare)
    assert cmds[i : i + 3] == [spare, "delete limit inet filter fastknock_pf_spare", spare]
    assert i > cmds.index("flush chain inet filter fastknock-prefilter-ip4")
    rules = [c for c in cmds if c.startswith("add rule")]
    assert cmds[-len(rules) :] == rules
    assert rules[-1].startswith("add rule inet filter fastknock-prefilter ")
    assert rules[-2].startswith("add rule inet filter fastknock-prefilter-udp ")
    assert rules[0].startswith("add rule inet filter fastknock-prefilter-ip4 ")
    # Chains not wanted (family ip: no IPv6 shed chains) are deleted.
    assert "delete chain inet filter fastknock-prefilter-ip6" in cmds


def test_proven_elements_last_at_least_the_minimum() -> None:
    assert prefilter.proven_element("10.0.0.1", 30) == "10.0.0.1 timeout 600s"
    assert prefilter.proven_element("fd00::1", 3600) == "fd00::1 timeout 3600s"


def test_lease_installs_add_the_address_to_the_proven_set() -> None:
    class NoRunner:
        name = "none"

        def run(self, commands: str, json_output: bool = False) -> str:
            raise AssertionError("not used")

    def leases(cfg: NftablesConfig, udp: bool) -> list[str]:
        fw = Firewall(cfg, NoRunner(), control_port=5800, control_udp=udp, seed=SEED)
        a = ipaddress.ip_address("10.0.0.1")
        changes = [
            Change(PortLease(a, "tcp", 22), True, 30),
            Change(PortLease(a, "udp", 22), True, 30),
            Change(PortLease(ipaddress.ip_address("10.0.0.2"), "tcp", 22), False),
        ]
        return fw.commands(changes, {})

    cmds = leases(CFG, udp=True)
    proven = [c for c in cmds if "fastknock_proven4" in c]
    assert proven == [  # once per address; revokes add nothing
        "add element inet filter fastknock_proven4 { 10.0.0.1 }",
        "delete element inet filter fastknock_proven4 { 10.0.0.1 }",
        "add element inet filter fastknock_proven4 { 10.0.0.1 timeout 600s }",
    ]
    # No pre-filter (TCP only, or off): no proven set to add to.
    assert not any("proven" in c for c in leases(CFG, udp=False))
    off = dataclasses.replace(CFG, prefilter=False)
    assert not any("proven" in c for c in leases(off, udp=True))


def test_counters_and_top_source_are_read_from_nft_json() -> None:
    listing = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "inet", "name": "fastknock_pf_dropped_ip4", "table": "filter",
                     "handle": 3, "packets": 42, "bytes": 2688}},
        {"counter": {"family": "inet", "name": "someone_else", "packets": 9}},
    ]})  # fmt: skip
    assert prefilter.parse_counters(listing) == {"dropped_ip4": 42}
    assert prefilter.parse_counters("not json") == {}
    top = json.dumps({"nftables": [{"set": {"name": "fastknock_pf_top4", "elem": [
        {"elem": {"val": "10.0.0.1", "expires": 10, "counter": {"packets": 5, "bytes": 1}}},
        {"elem": {"val": "10.0.0.9", "expires": 10, "counter": {"packets": 70, "bytes": 1}}},
        "10.0.0.3",
    ]}}]})  # fmt: skip
    assert prefilter.parse_top(top) == ("10.0.0.9", 70)
    assert prefilter.parse_top(json.dumps({"nftables": [{"set": {"name": "x"}}]})) is None
    assert prefilter.top_prefix("ip6group", "2001:db8:1::", CFG) == "2001:db8:1::/48"
    assert prefilter.top_prefix("ip4", "10.0.0.9", CFG) == "10.0.0.9/32"


def test_shedding_warns_at_most_once_an_interval_and_not_for_old_counts() -> None:
    s = prefilter.Shedding(interval=60.0)
    assert s.update({"dropped_ip4": 500}, now=0.0) is None  # the first poll: history
    assert s.update({"dropped_ip4": 500}, now=10.0) is None  # nothing new
    assert s.update({"dropped_ip4": 900, "dropped_ip6": 1}, now=20.0) == ("ip4", 400)
    assert s.update({"dropped_ip4": 990}, now=50.0) is None  # within the minute
    assert s.update({"dropped_ip4": 990, "dropped_ip6group": 5}, now=85.0) == ("ip6group", 5)
    line = prefilter.Shedding.line("ip4", 400, 10, "10.0.0.9/32")
    assert "400 datagrams" in line and "reason ip4" in line and "10.0.0.9/32" in line


def test_fwd_daemon_reads_the_counters_and_warns_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Daemon.poll_prefilter`` with a scripted firewall and an explicit clock."""
    import asyncio

    from fastknock.firewall import daemon as daemonmod
    from tests.test_fwd import FakeFirewall, make_config

    readings = iter([{"dropped_ip4": 100}, {"dropped_ip4": 100}, {"dropped_ip4": 900},
                     {"dropped_ip4": 950}, {"dropped_ip4": 950, "dropped_ip6": 30}])  # fmt: skip

    class Scripted(FakeFirewall):
        def prefilter_counters(self) -> dict[str, int]:
            return next(readings)

        def prefilter_top(self, reason: str) -> str | None:
            return {"ip4": "198.51.100.7/32", "ip6": "2001:db8:1:2::/64"}[reason]

    cfg = make_config()
    clock = [0.0]
    fw = Scripted(cfg)
    fw.prefilter = True  # as with a UDP control port
    d = daemonmod.Daemon(cfg, fw, daemonmod.ServerAccount(1, 1), lambda: clock[0])
    warnings = []
    for t in (0, 10, 20, 30, 80):
        clock[0] = t
        caplog.clear()
        asyncio.run(d.poll_prefilter())
        warnings.append([r.getMessage() for r in caplog.records if r.levelname == "WARNING"])
    assert warnings[0] == warnings[1] == warnings[3] == []  # history; nothing new; < 1 min
    assert len(warnings[2]) == 1 and "800 datagrams" in warnings[2][0]
    assert "reason ip4" in warnings[2][0] and "198.51.100.7/32" in warnings[2][0]
    assert len(warnings[4]) == 1 and "2001:db8:1:2::/64" in warnings[4][0]
    fams = {f.name: f for f in d.metric_families()}
    assert fams["fastknockfwd_prefilter_dropped_total"].samples[0].value == 950


# --- real kernel ------------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    netns.require()
    with netns.namespace("pf") as name:
        netns.load_ruleset(name)
        yield name


def _setup(ns: str, cfg: NftablesConfig, udp: bool = True) -> None:
    with netns.entered(ns):
        runner = LibNftables()
        try:
            Firewall(cfg, runner, control_port=5800, control_tcp=True, control_udp=udp).setup()
        finally:
            runner.close()


def _chain(ns: str) -> tuple[dict[str, object] | None, list[str]]:
    """(the base chain's JSON, the rules of the chain it jumps to, as text), or (None, [])
    if the base chain does not exist."""
    try:
        out = netns.nft(ns, "-j", "list", "chain", "inet", "filter", prefilter.CHAIN)
    except RuntimeError:
        return None, []
    items = json.loads(out)["nftables"]
    chain = next(i["chain"] for i in items if "chain" in i)
    base = netns.nft(ns, "list", "chain", "inet", "filter", prefilter.CHAIN)
    assert "udp dport 5800 fib daddr type local jump fastknock-prefilter-udp" in base
    text = netns.nft(ns, "list", "chain", "inet", "filter", prefilter.UDP_CHAIN)
    lines = [ln.strip() for ln in text.splitlines()]
    return chain, [ln for ln in lines if ln and not ln.startswith(("table", "chain", "}"))]


def test_setup_makes_a_prerouting_chain_before_conntrack(ns: str) -> None:
    _setup(ns, CFG)
    _setup(ns, CFG)  # idempotent
    chain, rules = _chain(ns)
    assert chain is not None
    assert (chain["type"], chain["hook"], chain["prio"], chain["policy"]) == (
        "filter",
        "prerouting",
        -300,  # raw: before conntrack (-200)
        "accept",
    )
    assert len(rules) == 6 and "udp length != 64" in rules[0] and "@fastknock_proven4" in rules[1]
    assert "jhash ip saddr mod 65536 seed 0x" in rules[3]
    assert "limit rate over 100/second burst 200 packets" in rules[3]
    sets = netns.nft(ns, "list", "sets", "inet")
    for name in ("fastknock_pf_slots4", "fastknock_pf_slots6g", "fastknock_proven6"):
        assert name in sets
    assert "rate 20000/second" in netns.nft(ns, "list", "limit", "inet", "filter", prefilter.SPARE)
    # chain-input keeps only the usual static rules
    text = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "prefilter" not in text and "udp dport 5800 accept" in text


def test_each_setup_draws_a_new_seed(ns: str) -> None:
    _setup(ns, CFG)
    first = _chain(ns)[1][3]
    _setup(ns, CFG)
    assert _chain(ns)[1][3] != first


def test_changed_options_replace_the_rules_and_off_removes_the_chain(ns: str) -> None:
    _setup(ns, CFG)
    _setup(ns, dataclasses.replace(CFG, prefilter_rate=10, prefilter_burst=20, prefilter_spare=7))
    _, rules = _chain(ns)
    assert len(rules) == 6 and "limit rate over 10/second burst 20 packets" in rules[3]
    assert "rate 7/second" in netns.nft(ns, "list", "limit", "inet", "filter", prefilter.SPARE)
    _setup(ns, dataclasses.replace(CFG, prefilter=False))
    assert _chain(ns) == (None, [])
    chains = netns.nft(ns, "list", "chains", "inet")
    assert "fastknock-prefilter-ip4" not in chains and "fastknock-prefilter-udp" not in chains
    _setup(ns, CFG)
    _setup(ns, CFG, udp=False)  # a TCP-only control port has no pre-filter
    assert _chain(ns) == (None, [])


def test_the_old_per_address_sets_are_replaced(ns: str) -> None:
    netns.nft(ns, "add", "set", "inet", "filter", "fastknock_prefilter4", "{ type ipv4_addr; "
              "size 65536; flags dynamic,timeout; timeout 60s; }")  # fmt: skip
    netns.nft(ns, "add chain inet filter fastknock-prefilter { type filter hook prerouting "
              "priority raw; policy accept; }")  # fmt: skip
    netns.nft(ns, "add rule inet filter fastknock-prefilter update @fastknock_prefilter4 "
              "{ ip saddr limit rate over 100/second } drop")  # fmt: skip
    _setup(ns, CFG)
    assert "fastknock_prefilter4" not in netns.nft(ns, "list", "sets", "inet")
    assert len(_chain(ns)[1]) == 6


def test_rules_of_the_old_layout_in_chain_input_are_removed(ns: str) -> None:
    netns.nft(ns, "add", "rule", "inet", "filter", "LETMEIN-INPUT", "udp", "dport", "5800",
              "udp", "length", "!=", "64", "drop", "comment",
              '"fastknock:prefilter-size:5800"')  # fmt: skip
    _setup(ns, CFG)
    text = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "prefilter" not in text
