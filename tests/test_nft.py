"""The nftables layer: command generation (pure) and both runners on the real kernel.

Kernel tests run in a network namespace they create and delete; they skip only without
root/nft/ip, and fail instead when $CI is set.
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
    parse_jump_comment,
)
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables, NftExe, Runner
from tests import netns

A4 = ipaddress.IPv4Address("192.0.2.7")
B4 = ipaddress.IPv4Address("192.0.2.8")
A6 = ipaddress.IPv6Address("2001:db8::7")
CFG = NftablesConfig(
    chain_input="LETMEIN-INPUT", chain_forward="LETMEIN-FORWARD", chain_output="LETMEIN-OUTPUT"
)


class Recorder:
    name = "recorder"

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def run(self, commands: str, json_output: bool = False) -> str:
        self.calls.append(commands)
        if self.fail_on is not None and self.fail_on in commands:
            raise FirewallError("boom")
        return '{"nftables": []}'


def test_commands_group_per_set_and_refresh_portably() -> None:
    fw = Firewall(CFG, Recorder(), clock=lambda: 1000.0)
    cmds = fw.commands(
        [
            Change(PortLease(A4, "tcp", 22), True, 30),
            Change(PortLease(B4, "tcp", 22), False),
            Change(PortLease(A6, "udp", 53), True, 5),
        ],
        {},
    )
    assert cmds == [
        "add element inet filter fastknock_tcp4 { 192.0.2.7 . 22, 192.0.2.8 . 22 }",
        "delete element inet filter fastknock_tcp4 { 192.0.2.7 . 22, 192.0.2.8 . 22 }",
        "add element inet filter fastknock_tcp4 { 192.0.2.7 . 22 timeout 30s }",
        "add element inet filter fastknock_udp6 { 2001:db8::7 . 53 }",
        "delete element inet filter fastknock_udp6 { 2001:db8::7 . 53 }",
        "add element inet filter fastknock_udp6 { 2001:db8::7 . 53 timeout 5s }",
    ]


def test_jump_commands_replace_existing_rules() -> None:
    fw = Firewall(CFG, Recorder(), clock=lambda: 1000.0)
    lease = JumpLease(0xAABBCCDD, "output", "MYCHAIN-OUTPUT", A4)
    cmds = fw.commands([Change(lease, True, 60)], {lease: ["LETMEIN-OUTPUT handle 7"]})
    assert cmds == [
        "delete rule inet filter LETMEIN-OUTPUT handle 7",
        "add rule inet filter LETMEIN-OUTPUT ip saddr 192.0.2.7 jump MYCHAIN-OUTPUT "
        'comment "fastknock:jump:aabbccdd:output:MYCHAIN-OUTPUT:192.0.2.7:1060"',
    ]
    unmatched = JumpLease(1, "input", "X", None)
    assert fw.commands([Change(unmatched, False)], {}) == []
    assert "jump X comment" in fw.commands([Change(unmatched, True, 1)], {})[0]


def test_family_restrictions() -> None:
    fw = Firewall(NftablesConfig(chain_input="IN", family="ip"), Recorder())
    assert fw.supports(A4) and not fw.supports(A6)
    assert "fastknock_tcp6" not in " ".join(fw.static_rules().values())
    with pytest.raises(FirewallError):
        fw.commands([Change(PortLease(A6, "tcp", 1), True, 1)], {})
    with pytest.raises(FirewallError):
        fw.commands([Change(JumpLease(1, "forward", "X", None), True, 1)], {})
    with pytest.raises(FirewallError):
        Firewall(NftablesConfig(chain_input='IN" accept; flush ruleset'), Recorder())
    with pytest.raises(FirewallError):
        Firewall(NftablesConfig(chain_input="IN", family="bridge"), Recorder())


@pytest.mark.parametrize("addr", [A4, A6, None])
def test_jump_comment_round_trip(addr: ipaddress.IPv4Address | None) -> None:
    lease = JumpLease(0x1, "forward", "MY-CHAIN.x", addr)
    assert parse_jump_comment(jump_comment(lease, 123)) == (lease, 123.0)
    assert len(jump_comment(JumpLease(2**32 - 1, "forward", "X" * 40, A6), 2**33)) <= 128


@pytest.mark.parametrize(
    "comment",
    [
        "fastknock:tcp4",
        "fastknock:jump:zz:input:X:any:1",
        "fastknock:jump:1:sideways:X:any:1",
        "fastknock:jump:1:input:X:not-an-ip:1",
        "fastknock:jump:1:input:X:any:soon",
        "other",
    ],
)
def test_foreign_comments_ignored(comment: str) -> None:
    assert parse_jump_comment(comment) is None


def test_batch_failure_falls_back_one_by_one() -> None:
    rec = Recorder(fail_on="192.0.2.8")
    fw = Firewall(CFG, rec)
    results = fw.apply(
        [Change(PortLease(A4, "tcp", 22), True, 30), Change(PortLease(B4, "tcp", 22), True, 30)]
    )
    assert results[0] is None and results[1] is not None
    assert fw.stats.transactions == 3 and fw.stats.fallbacks == 1
    assert fw.stats.failed_transactions == 2


# --- real kernel, both runners ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    netns.require()
    with netns.namespace("nft") as name:
        yield name


@pytest.fixture(params=["libnftables", "nft-exe"])
def fw(request: pytest.FixtureRequest, ns: str) -> Iterator[Firewall]:
    netns.load_ruleset(
        ns,
        extra=netns.MYCHAINS + "add rule inet filter LETMEIN-INPUT "
        'tcp dport 9 accept comment "admin rule"\n',
    )
    with netns.entered(ns):
        runner: Runner = LibNftables() if request.param == "libnftables" else NftExe("nft")
    yield Firewall(CFG, runner, control_port=5800, control_tcp=True, control_udp=True)
    if isinstance(runner, LibNftables):
        runner.close()


def _chain(ns: str, chain: str = "LETMEIN-INPUT") -> str:
    return netns.nft(ns, "list", "chain", "inet", "filter", chain)


def test_setup_idempotent_and_keeps_foreign_rules(fw: Firewall, ns: str) -> None:
    with netns.entered(ns):
        fw.setup()
        fw.setup()
    text = _chain(ns)
    assert text.count('comment "fastknock:') == 6  # 2 control + 4 set rules
    assert 'tcp dport 9 accept comment "admin rule"' in text
    assert "udp dport 5800 accept" in text and "@fastknock_udp6" in text
    # A changed control port replaces only the stale control rule.
    with netns.entered(ns):
        Firewall(CFG, fw.runner, control_port=5900, control_udp=False).setup()
    text = _chain(ns)
    assert "5800" not in text and "tcp dport 5900 accept" in text
    assert text.count('comment "fastknock:') == 5 and "admin rule" in text


def test_install_refresh_revoke(fw: Firewall, ns: str) -> None:
    jump = JumpLease(7, "forward", "MYCHAIN-FORWARD", A6)
    with netns.entered(ns):
        fw.setup()
        assert fw.apply([Change(PortLease(A4, "tcp", 22), True, 100), Change(jump, True, 100)]) == [
            None,
            None,
        ]
        assert fw.stats.transactions == 1
        # Re-knock with a shorter timeout: the element is refreshed, not duplicated.
        assert fw.apply([Change(PortLease(A4, "tcp", 22), True, 10), Change(jump, True, 10)]) == [
            None,
            None,
        ]
        live = {lease.key: lease.remaining for lease in fw.scan()}
        assert set(live) == {PortLease(A4, "tcp", 22), jump}
        assert all(r is not None and r <= 11 for r in live.values())
        assert _chain(ns, "LETMEIN-FORWARD").count("jump MYCHAIN-FORWARD") == 1
        # Revoke, twice: the second revoke of a missing lease also succeeds.
        for _ in range(2):
            revoke = [Change(PortLease(A4, "tcp", 22), False), Change(jump, False)]
            assert fw.apply(revoke) == [None, None]
        assert fw.scan() == []
        assert "jump" not in _chain(ns, "LETMEIN-FORWARD")


def test_failed_item_does_not_fail_batch(fw: Firewall, ns: str) -> None:
    with netns.entered(ns):
        fw.setup()
        results = fw.apply(
            [
                Change(PortLease(A4, "udp", 53), True, 100),
                Change(JumpLease(1, "input", "NO-SUCH-CHAIN", None), True, 100),
                Change(PortLease(B4, "tcp", 22), True, 100),
            ]
        )
        assert results[0] is None and results[2] is None
        assert results[1] is not None and "NO-SUCH-CHAIN" in results[1]
        assert fw.stats.fallbacks == 1
        assert {lease.key for lease in fw.scan()} == {
            PortLease(A4, "udp", 53),
            PortLease(B4, "tcp", 22),
        }


def test_scan_reads_elements_added_by_hand(fw: Firewall, ns: str) -> None:
    with netns.entered(ns):
        fw.setup()
    netns.nft(ns, "add", "element", "inet", "filter", "fastknock_tcp6", "{ 2001:db8::7 . 80 }")
    with netns.entered(ns):
        assert fw.scan() == [LiveLease(PortLease(A6, "tcp", 80), None)]


def test_missing_chain_is_a_clear_error(fw: Firewall, ns: str) -> None:
    bad = NftablesConfig(chain_input="LETMEIN-INPUT", chain_forward="NOPE")
    with netns.entered(ns), pytest.raises(FirewallError, match="NOPE.*chain-forward"):
        Firewall(bad, fw.runner).setup()
