"""The nftables layer for prefix leases and port ranges: the interval sets, their commands,
reading them back, and a kernel that refuses them.

Kernel tests run in a network namespace they create and delete (tests/netns.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from fastknock.conf.config import NftablesConfig
from fastknock.errors import FirewallError
from fastknock.firewall.leases import (
    Change,
    JumpLease,
    LiveLease,
    PortLease,
    jump_comment,
    parse_elements,
    parse_jump_comment,
)
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables
from tests import netns
from tests.test_nft import A4, CFG, Recorder

NET4 = ipaddress.ip_network("192.0.2.0/24")
NET6 = ipaddress.ip_network("2001:db8:1:2::/64")


def test_wide_leases_go_to_the_interval_sets_exact_ones_stay() -> None:
    fw = Firewall(CFG, Recorder(), clock=lambda: 1000.0, ranges=True)
    cmds = fw.commands(
        [
            Change(PortLease(NET4, "tcp", 22), True, 30),
            Change(PortLease(A4, "udp", 60000, 61000), True, 30),
            Change(PortLease(NET6, "udp", 60000, 61000), False),
            Change(PortLease(A4, "tcp", 22), True, 30),  # exact: the hash set
        ],
        {},
    )
    assert cmds == [  # removals from interval sets first: an overlapping add would fail
        "add element inet filter fastknock_udp6_ranges { 2001:db8:1:2::/64 . 60000-61000 }",
        "delete element inet filter fastknock_udp6_ranges { 2001:db8:1:2::/64 . 60000-61000 }",
        "add element inet filter fastknock_tcp4_ranges { 192.0.2.0/24 . 22 }",
        "delete element inet filter fastknock_tcp4_ranges { 192.0.2.0/24 . 22 }",
        "add element inet filter fastknock_tcp4_ranges { 192.0.2.0/24 . 22 timeout 30s }",
        "add element inet filter fastknock_udp4_ranges { 192.0.2.7 . 60000-61000 }",
        "delete element inet filter fastknock_udp4_ranges { 192.0.2.7 . 60000-61000 }",
        "add element inet filter fastknock_udp4_ranges { 192.0.2.7 . 60000-61000 timeout 30s }",
        "add element inet filter fastknock_tcp4 { 192.0.2.7 . 22 }",
        "delete element inet filter fastknock_tcp4 { 192.0.2.7 . 22 }",
        "add element inet filter fastknock_tcp4 { 192.0.2.7 . 22 timeout 30s }",
    ]


def test_without_interval_sets_a_wide_lease_is_an_error_not_a_narrower_one() -> None:
    fw = Firewall(CFG, Recorder())
    with pytest.raises(FirewallError, match="no interval sets"):
        fw.commands([Change(PortLease(NET4, "tcp", 22), True, 30)], {})


def test_static_rules_with_ranges() -> None:
    rules = Firewall(CFG, Recorder(), ranges=True).static_rules()
    assert rules["fastknock:tcp4_ranges"] == ("ip saddr . tcp dport @fastknock_tcp4_ranges accept")
    assert rules["fastknock:udp6_ranges"] == ("ip6 saddr . udp dport @fastknock_udp6_ranges accept")
    plain = Firewall(CFG, Recorder()).static_rules()  # the control: no range rules
    assert not any("ranges" in c for c in plain) and "fastknock:tcp4" in plain


class NoRanges(Recorder):
    """A kernel (or nft) without interval+timeout sets over concatenations."""

    def run(self, commands: str, json_output: bool = False) -> str:
        self.calls.append(commands)
        if "flags interval, timeout" in commands or "_ranges" in commands.split("\n")[0]:
            raise FirewallError("Error: Could not process rule: Operation not supported")
        return '{"nftables": []}'


def test_a_kernel_without_interval_timeout_sets_is_named_at_setup() -> None:
    rec = NoRanges()
    with pytest.raises(FirewallError, match="cannot hold port ranges or prefix leases"):
        Firewall(CFG, rec, ranges=True).setup()
    assert not any("add rule" in c for c in rec.calls)  # nothing installed meanwhile
    # The control: a config without ranges never asks for them and sets up.
    rec = NoRanges()
    fw = Firewall(CFG, rec)
    fw.setup()
    assert not fw.ranges and any("@fastknock_tcp4 accept" in c for c in rec.calls)


def test_proven_sets_get_the_knockers_not_the_prefix() -> None:
    cfg = NftablesConfig(chain_input="IN")
    fw = Firewall(cfg, Recorder(), control_port=5800, control_udp=True, ranges=True)
    assert fw.prefilter
    b4 = ipaddress.IPv4Address("192.0.2.8")
    cmds = fw.commands([Change(PortLease(NET4, "tcp", 22), True, 30, ((A4, 30), (b4, 30)))], {})
    proven = [c for c in cmds if "fastknock_proven4" in c]
    assert proven[0] == "add element inet filter fastknock_proven4 { 192.0.2.7, 192.0.2.8 }"
    assert "192.0.2.0/24" not in " ".join(proven)
    # Without holders given, an exact key proves its own address, a prefix none.
    assert Change(PortLease(A4, "tcp", 22), True, 9).proven_sources() == ((A4, 9),)
    assert Change(PortLease(NET4, "tcp", 22), True, 9).proven_sources() == ()


def test_jump_with_a_prefix_matches_the_network() -> None:
    fw = Firewall(CFG, Recorder(), clock=lambda: 1000.0)
    lease = JumpLease(0x12, "input", "MYCHAIN-INPUT", NET4)
    [cmd] = fw.commands([Change(lease, True, 60)], {})
    assert cmd.startswith("add rule inet filter LETMEIN-INPUT ip saddr 192.0.2.0/24 jump ")
    assert parse_jump_comment(jump_comment(lease, 1060)) == (lease, 1060.0)
    six = JumpLease(0x12, "input", "X" * 40, NET6)
    assert parse_jump_comment(jump_comment(six, 2**33)) == (six, float(2**33))
    assert len(jump_comment(JumpLease(2**32 - 1, "forward", "X" * 40, NET6), 2**33)) <= 128
    # A network with host bits set is not one we wrote.
    assert parse_jump_comment("fastknock:jump:1:input:X:192.0.2.7/24:5") is None


def test_parse_elements_reads_prefixes_and_ranges() -> None:
    """nft 1.0.6's JSON for the interval sets (as listed by the kernel test below)."""
    elems = [
        {"elem": {"val": {"concat": [{"prefix": {"addr": "10.1.2.0", "len": 24}},
                                     {"range": [60000, 61000]}]}, "timeout": 30, "expires": 29}},
        {"elem": {"val": {"concat": ["10.1.3.7", 22]}, "timeout": 40, "expires": 39}},
        {"elem": {"val": {"concat": [{"range": ["10.0.0.1", "10.0.0.9"]}, 22]}}},  # by hand
    ]  # fmt: skip
    assert parse_elements(elems, "udp") == [
        LiveLease(PortLease(ipaddress.ip_network("10.1.2.0/24"), "udp", 60000, 61000), 29.0),
        LiveLease(PortLease(ipaddress.ip_address("10.1.3.7"), "udp", 22), 39.0),
    ]


# --- real kernel ------------------------------------------------------------------------------


@pytest.fixture
def fw() -> Iterator[tuple[Firewall, str]]:
    netns.require()
    with netns.namespace("nftr") as ns:
        netns.load_ruleset(ns, extra=netns.MYCHAINS)
        with netns.entered(ns):
            runner = LibNftables()
        yield Firewall(CFG, runner, control_port=5800, ranges=True), ns
        runner.close()


def test_kernel_setup_install_scan_revoke(fw: tuple[Firewall, str]) -> None:
    firewall, ns = fw
    leases = [
        PortLease(NET4, "tcp", 22),
        PortLease(NET6, "tcp", 22),
        PortLease(A4, "udp", 60000, 61000),
        PortLease(NET4, "udp", 60000, 61000),
    ]
    jump = JumpLease(0x12, "input", "MYCHAIN-INPUT", NET4)
    with netns.entered(ns):
        firewall.setup()
        firewall.setup()  # idempotent
        assert firewall.apply([Change(k, True, 100) for k in [*leases, jump]]) == [None] * 5
        assert firewall.apply([Change(leases[0], True, 50)]) == [None]  # refresh in place
        live = {lease.key: lease.remaining for lease in firewall.scan()}
    assert set(live) == {*leases, jump}
    assert live[leases[0]] is not None and live[leases[0]] <= 50
    chain = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "ip saddr . tcp dport @fastknock_tcp4_ranges accept" in chain
    assert "ip saddr 192.0.2.0/24 jump MYCHAIN-INPUT" in chain
    text = netns.nft(ns, "list", "set", "inet", "filter", "fastknock_udp4_ranges")
    assert "flags interval,timeout" in text and "192.0.2.0/24 . 60000-61000" in text
    with netns.entered(ns):
        assert firewall.apply([Change(leases[0], False), Change(jump, False)]) == [None, None]
        assert firewall.apply([Change(leases[0], False)]) == [None]  # missing: still ACK
        assert {lease.key for lease in firewall.scan()} == set(leases[1:])


def test_kernel_interval_sets_stay_served_without_ranges(fw: tuple[Firewall, str]) -> None:
    """A reload to a config without ranges keeps the sets' rules: their live leases keep
    working until they expire (they are not silently cut)."""
    firewall, ns = fw
    with netns.entered(ns):
        firewall.setup()
        firewall.apply([Change(PortLease(NET4, "tcp", 22), True, 100)])
        listing = Firewall(CFG, firewall.runner, control_port=5800)  # as --list makes it
        assert listing.scan() == []  # not set up, not detected: the exact sets only
        assert listing.detect_ranges()
        assert [lease.key for lease in listing.scan()] == [PortLease(NET4, "tcp", 22)]
        plain = Firewall(CFG, firewall.runner, control_port=5800)
        plain.setup()
        assert plain.ranges
        assert [lease.key for lease in plain.scan()] == [PortLease(NET4, "tcp", 22)]
    chain = netns.nft(ns, "list", "chain", "inet", "filter", "LETMEIN-INPUT")
    assert "@fastknock_tcp4_ranges" in chain


def test_kernel_replaces_an_overlapping_old_shape_in_one_transaction(
    fw: tuple[Firewall, str],
) -> None:
    """The removal goes first whatever the order of the changes: the kernel refuses an
    element that overlaps a live one, so the other order fails (the control)."""
    firewall, ns = fw
    old = PortLease(ipaddress.ip_network("192.0.0.0/16"), "tcp", 22)
    new = PortLease(NET4, "tcp", 22)
    with netns.entered(ns):
        firewall.setup()
        assert firewall.apply([Change(old, True, 100)]) == [None]
        [error] = firewall.apply([Change(new, True, 100)])
        assert error is not None and "File exists" in error  # the control: overlap refused
        assert firewall.apply([Change(new, True, 100), Change(old, False)]) == [None, None]
        assert [lease.key for lease in firewall.scan()] == [new]
