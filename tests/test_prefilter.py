"""The pre-filter's nftables rules (``fastknock.prefilter``): generation and placement.

Pure command generation first; then ``Firewall.setup`` on the real kernel in a namespace
this module creates (skipped without root/nft/ip, failing instead when $CI is set). The
traffic tests are in test_prefilter_e2e.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from fastknock import prefilter
from fastknock.config import NftablesConfig
from fastknock.nft import Firewall, LibNftables
from tests import netns

CFG = NftablesConfig(chain_input="LETMEIN-INPUT")
WHERE = "inet filter"


def test_rules_inet_defaults() -> None:
    assert prefilter.rules(CFG, (4, 6), 5800) == [
        ("fastknock:prefilter-size:5800", "udp dport 5800 udp length != 64 drop"),
        (
            "fastknock:prefilter-rate4:5800:100:200",
            "udp dport 5800 update @fastknock_prefilter4 "
            "{ ip saddr limit rate over 100/second burst 200 packets } drop",
        ),
        (
            "fastknock:prefilter-rate6:5800:100:200:64",
            "udp dport 5800 update @fastknock_prefilter6 "
            "{ ip6 saddr and ffff:ffff:ffff:ffff:: limit rate over 100/second burst 200 packets }"
            " drop",
        ),
    ]


def test_rules_follow_the_family_and_options() -> None:
    cfg = dataclasses.replace(CFG, prefilter_rate=7, prefilter_burst=9, prefilter_ipv6_prefix=56)
    (size, v6) = prefilter.rules(cfg, (6,), 5900)
    assert size[0] == "fastknock:prefilter-size:5900"
    assert v6[0] == "fastknock:prefilter-rate6:5900:7:9:56"
    assert "ip6 saddr and ffff:ffff:ffff:ff00:: limit rate over 7/second burst 9 packets" in v6[1]
    assert [c for c, _ in prefilter.rules(cfg, (4,), 5900)][1:] == [
        "fastknock:prefilter-rate4:5900:7:9"
    ]
    full = dataclasses.replace(CFG, prefilter_ipv6_prefix=128)
    assert "{ ip6 saddr limit" in prefilter.rules(full, (6,), 1)[1][1]


def test_no_rules_when_off_or_without_udp_control_port() -> None:
    assert prefilter.rules(dataclasses.replace(CFG, prefilter=False), (4, 6), 5800) == []
    assert prefilter.rules(CFG, (4, 6), None) == []
    # ... and existing ones are removed
    cmds = prefilter.commands(CFG, WHERE, (4, 6), None, [("fastknock:prefilter-size:1", 4)])
    assert cmds == ["delete rule inet filter LETMEIN-INPUT handle 4"]


def test_commands_insert_in_order_at_the_top() -> None:
    cmds = prefilter.commands(CFG, WHERE, (4,), 5800, [("", 1), ("fastknock:udp4", 2)])
    assert cmds[0].startswith("add set inet filter fastknock_prefilter4 { type ipv4_addr;")
    assert "flags dynamic,timeout" in cmds[0]
    # inserted last-first: the size rule ends up on top
    assert [c.split(" comment ")[1] for c in cmds[1:]] == [
        '"fastknock:prefilter-rate4:5800:100:200"',
        '"fastknock:prefilter-size:5800"',
    ]
    assert all(
        c.startswith("insert rule inet filter LETMEIN-INPUT udp dport 5800") for c in cmds[1:]
    )


def test_commands_leave_rules_in_place_alone() -> None:
    wanted = [c for c, _ in prefilter.rules(CFG, (4,), 5800)]
    chain = [(wanted[0], 7), (wanted[1], 8), ("", 3), ("fastknock:control-udp:5800", 9)]
    cmds = prefilter.commands(CFG, WHERE, (4,), 5800, chain)
    assert all(c.startswith("add set") for c in cmds)  # sets only: idempotent


SIZE = "fastknock:prefilter-size:5800"
RATE4 = "fastknock:prefilter-rate4:5800:100:200"


@pytest.mark.parametrize(
    "chain",
    [
        [("", 1), (SIZE, 7), (RATE4, 8)],  # a foreign rule above them
        [(RATE4, 8), (SIZE, 7)],  # wrong order
        [(SIZE, 7), ("fastknock:prefilter-rate4:5800:50:200", 8)],  # stale parameters
        [(SIZE, 7), (RATE4, 8), ("fastknock:prefilter-rate6:5800:100:200:64", 9)],  # extra
    ],
)
def test_commands_replace_misplaced_or_stale_rules(chain: list[tuple[str, int]]) -> None:
    cmds = [c for c in prefilter.commands(CFG, WHERE, (4,), 5800, chain) if "set" not in c[:8]]
    handles = sorted(h for c, h in chain if c)
    deletes = [f"delete rule inet filter LETMEIN-INPUT handle {h}" for h in handles]
    assert sorted(cmds[: len(deletes)]) == deletes
    assert [c.split(" comment ")[1] for c in cmds[len(deletes) :]] == [f'"{RATE4}"', f'"{SIZE}"']


# --- real kernel ------------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    netns.require()
    with netns.namespace("pf") as name:
        netns.load_ruleset(name)
        yield name


def _input(ns: str) -> list[str]:
    text = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    return [line.strip() for line in text.splitlines() if "dport" in line or "@" in line]


def _setup(ns: str, cfg: NftablesConfig, udp: bool = True) -> None:
    with netns.entered(ns):
        runner = LibNftables()
        try:
            Firewall(cfg, runner, control_port=5800, control_tcp=True, control_udp=udp).setup()
        finally:
            runner.close()


def test_setup_puts_the_prefilter_before_the_control_accept(ns: str) -> None:
    netns.nft(ns, "add", "rule", "inet", "filter", "LETMEIN-INPUT", "tcp", "dport", "9", "accept")
    _setup(ns, CFG)
    _setup(ns, CFG)  # idempotent
    rules = _input(ns)
    assert [r.split('comment "')[1].rstrip('"') for r in rules[:3]] == [
        "fastknock:prefilter-size:5800",
        "fastknock:prefilter-rate4:5800:100:200",
        "fastknock:prefilter-rate6:5800:100:200:64",
    ]
    assert "udp length != 64 drop" in rules[0]
    accept = next(i for i, r in enumerate(rules) if "fastknock:control-udp:5800" in r)
    assert accept > 2
    assert sum("prefilter" in r for r in rules) == 3
    sets = netns.nft(ns, "list", "sets", "inet")
    assert "fastknock_prefilter4" in sets and "fastknock_prefilter6" in sets


def test_changed_options_replace_the_rules_and_off_removes_them(ns: str) -> None:
    _setup(ns, CFG)
    _setup(ns, dataclasses.replace(CFG, prefilter_rate=10, prefilter_burst=20))
    rules = _input(ns)
    assert sum("prefilter" in r for r in rules) == 3
    assert "limit rate over 10/second burst 20 packets" in rules[1]
    _setup(ns, dataclasses.replace(CFG, prefilter=False))
    assert not any("prefilter" in r for r in _input(ns))
    assert any("fastknock:control-udp:5800" in r for r in _input(ns))
    _setup(ns, CFG, udp=False)  # a TCP-only control port has no pre-filter
    assert not any("prefilter" in r for r in _input(ns))
