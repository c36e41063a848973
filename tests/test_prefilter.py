"""The pre-filter's nftables chain (``fastknock.firewall.prefilter``): generation and placement.

Pure command generation first; then ``Firewall.setup`` on the real kernel in a namespace
this module creates (skipped without root/nft/ip, failing instead when $CI is set). The
traffic tests are in test_prefilter_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from fastknock.conf.config import NftablesConfig
from fastknock.firewall import prefilter
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables
from tests import netns

CFG = NftablesConfig(chain_input="LETMEIN-INPUT")
WHERE = "inet filter"
MATCH = "udp dport 5800 fib daddr type local"


def test_rules_inet_defaults() -> None:
    assert prefilter.rules(CFG, (4, 6), 5800) == [
        f"{MATCH} udp length != 64 drop",
        f"{MATCH} update @fastknock_prefilter4 "
        "{ ip saddr limit rate over 100/second burst 200 packets } drop",
        f"{MATCH} update @fastknock_prefilter6 "
        "{ ip6 saddr and ffff:ffff:ffff:ffff:: limit rate over 100/second burst 200 packets }"
        " drop",
    ]


def test_rules_follow_the_family_and_options() -> None:
    cfg = dataclasses.replace(CFG, prefilter_rate=7, prefilter_burst=9, prefilter_ipv6_prefix=56)
    size, v6 = prefilter.rules(cfg, (6,), 5900)
    assert size == "udp dport 5900 fib daddr type local udp length != 64 drop"
    assert "ip6 saddr and ffff:ffff:ffff:ff00:: limit rate over 7/second burst 9 packets" in v6
    assert "@fastknock_prefilter4 { ip saddr limit rate over 7/" in prefilter.rules(cfg, (4,), 1)[1]
    full = dataclasses.replace(CFG, prefilter_ipv6_prefix=128)
    assert "{ ip6 saddr limit" in prefilter.rules(full, (6,), 1)[1]


def test_no_rules_when_off_or_without_udp_control_port() -> None:
    off = dataclasses.replace(CFG, prefilter=False)
    assert prefilter.rules(off, (4, 6), 5800) == []
    assert prefilter.rules(CFG, (4, 6), None) == []
    assert prefilter.commands(off, WHERE, (4, 6), 5800, chain_exists=False) == []
    assert prefilter.commands(CFG, WHERE, (4, 6), None, chain_exists=True) == [
        "flush chain inet filter fastknock-prefilter",
        "delete chain inet filter fastknock-prefilter",
    ]


def test_commands_build_the_chain_atomically() -> None:
    cmds = prefilter.commands(CFG, WHERE, (4,), 5800, chain_exists=True)
    assert cmds[0].startswith("add set inet filter fastknock_prefilter4 { type ipv4_addr;")
    assert "flags dynamic,timeout" in cmds[0] and "size 65536" in cmds[0]
    assert cmds[1:3] == [
        "add chain inet filter fastknock-prefilter "
        "{ type filter hook prerouting priority raw; policy accept; }",
        "flush chain inet filter fastknock-prefilter",
    ]
    assert cmds[3:] == [
        f"add rule inet filter fastknock-prefilter {r}" for r in prefilter.rules(CFG, (4,), 5800)
    ]


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
    """(the chain's JSON, its rules as text), or (None, []) if it does not exist."""
    try:
        out = netns.nft(ns, "-j", "list", "chain", "inet", "filter", prefilter.CHAIN)
    except RuntimeError:
        return None, []
    items = json.loads(out)["nftables"]
    chain = next(i["chain"] for i in items if "chain" in i)
    text = netns.nft(ns, "list", "chain", "inet", "filter", prefilter.CHAIN)
    return chain, [ln.strip() for ln in text.splitlines() if "dport" in ln]


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
    assert len(rules) == 3 and "udp length != 64 drop" in rules[0]
    assert "limit rate over 100/second burst 200 packets" in rules[1]
    sets = netns.nft(ns, "list", "sets", "inet")
    assert "fastknock_prefilter4" in sets and "fastknock_prefilter6" in sets
    # chain-input keeps only the usual static rules
    text = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "prefilter" not in text and "udp dport 5800 accept" in text


def test_changed_options_replace_the_rules_and_off_removes_the_chain(ns: str) -> None:
    _setup(ns, CFG)
    _setup(ns, dataclasses.replace(CFG, prefilter_rate=10, prefilter_burst=20))
    _, rules = _chain(ns)
    assert len(rules) == 3 and "limit rate over 10/second burst 20 packets" in rules[1]
    _setup(ns, dataclasses.replace(CFG, prefilter=False))
    assert _chain(ns) == (None, [])
    _setup(ns, CFG)
    _setup(ns, CFG, udp=False)  # a TCP-only control port has no pre-filter
    assert _chain(ns) == (None, [])


def test_rules_of_the_old_layout_in_chain_input_are_removed(ns: str) -> None:
    netns.nft(ns, "add", "rule", "inet", "filter", "LETMEIN-INPUT", "udp", "dport", "5800",
              "udp", "length", "!=", "64", "drop", "comment",
              '"fastknock:prefilter-size:5800"')  # fmt: skip
    _setup(ns, CFG)
    text = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "prefilter" not in text
