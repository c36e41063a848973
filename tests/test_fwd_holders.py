"""fastknockfwd with prefix opens and port ranges: what a request claims, and holders.

Against tests/test_fwd.py's fake firewall (no root), with an explicit clock. The kernel
side: tests/test_nft_ranges.py; the whole path: tests/test_ranges_e2e.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from fastknock.conf.config import Config, JumpResource, PortResource
from fastknock.firewall.daemon import Daemon, ServerAccount
from fastknock.firewall.holders import Claim, Draft, Holdings
from fastknock.firewall.leases import Change, JumpLease, PortLease, needs_ranges, source
from fastknock.ipc import FwOp, FwRequest, FwStatus
from fastknock.osutil import metrics
from tests.test_fwd import USER, USER2, FakeFirewall, make_config, req

NET24 = ipaddress.ip_network("192.0.2.0/24")
A1, A2 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
PREFIX = PortLease(NET24, "tcp", 22)


def config(max_nr_rules: int = 100) -> Config:
    base = make_config(max_nr_rules=max_nr_rules, chain_forward="FWD")
    resources = {
        0x10: PortResource(0x10, 22, ipv4_prefix=24, ipv6_prefix=64),
        0x11: PortResource(0x11, 60000, tcp=False, udp=True, port_last=61000),
        0x12: JumpResource(0x12, forward="MY-FWD", forward_match_saddr=True, ipv4_prefix=24),
        0x13: PortResource(0x13, 5000, port_last=6000),  # spans the control port 5800
        0x14: PortResource(0x14, 443),
    }
    return dataclasses.replace(base, resources=MappingProxyType(resources))


def daemon(cfg: Config | None = None, now: list[float] | None = None) -> Daemon:
    cfg = cfg or config()
    clock = now or [1000.0]
    return Daemon(cfg, FakeFirewall(cfg), ServerAccount(1, 1), clock=lambda: clock[0])


def run(d: Daemon, *reqs: FwRequest) -> list[FwStatus]:
    async def go() -> list[FwStatus]:
        return list(await asyncio.gather(*(d.submit(r) for r in reqs)))

    return asyncio.run(go())


def kernel(d: Daemon) -> dict[object, float]:
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    return fw.kernel


def test_source_is_the_network_or_the_address() -> None:
    a6 = ipaddress.ip_address("2001:db8:1:2:3:4:5:6")
    assert source(A1, 24) == NET24
    assert source(a6, 24, 64) == ipaddress.ip_network("2001:db8:1:2::/64")
    assert source(A1) == A1 and source(a6, 24, 128) == a6  # full length: the address


def test_claims_of_prefix_range_and_jump_resources() -> None:
    d = daemon()
    [claim] = d.validate(req(0x10, "192.0.2.77"))  # type: ignore[misc]
    assert claim.key == PREFIX and claim.holder == (USER, ipaddress.ip_address("192.0.2.77"))
    [claim] = d.validate(req(0x10, "2001:db8:1:2::9"))  # type: ignore[misc]
    assert claim.key == PortLease(ipaddress.ip_network("2001:db8:1:2::/64"), "tcp", 22)
    [claim] = d.validate(req(0x11))  # type: ignore[misc]
    assert claim.key == PortLease(A1, "udp", 60000, 61000) and claim.key.wide
    [claim] = d.validate(req(0x12))  # type: ignore[misc]
    assert claim.key == JumpLease(0x12, "forward", "MY-FWD", NET24)
    [claim] = d.validate(req(0x14))  # type: ignore[misc]
    assert claim.key == PortLease(A1, "tcp", 443) and not claim.key.wide  # the control


def test_range_over_the_control_port_is_refused_at_knock_time() -> None:
    assert daemon().validate(req(0x13)) == FwStatus.BAD_PORT


def test_needs_ranges_names_the_wide_port_resources() -> None:
    assert needs_ranges(config()) == [0x10, 0x11, 0x13]
    assert needs_ranges(make_config()) == []  # plain resources: no interval sets


def test_two_holders_of_one_prefix_one_revokes_the_other_keeps_it() -> None:
    now = [1000.0]
    d = daemon(now=now)
    assert run(d, req(0x10, "192.0.2.1")) == [FwStatus.ACK]
    now[0] = 1100.0
    assert run(d, req(0x10, "192.0.2.2", user=USER2)) == [FwStatus.ACK]
    assert kernel(d) == {PREFIX: 600}  # one element; re-set to the later deadline
    assert d.stats["live"] == 1 and d.stats["holders"] == 2 and d.stats["wide"] == 1
    # The first holder revokes: the element stays, until the second holder's deadline.
    now[0] = 1200.0
    assert run(d, req(0x10, "192.0.2.1", op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert kernel(d) == {PREFIX: 500}
    assert d.leases == {PREFIX: 1700.0} and d.stats["holders"] == 1
    # The last holder revokes: now it goes.
    assert run(d, req(0x10, "192.0.2.2", user=USER2, op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert kernel(d) == {} and d.leases == {}


def test_a_holder_with_an_earlier_deadline_never_shortens_the_element() -> None:
    """Two addresses of one /24: the later knock sets the deadline; a re-knock of the first
    (deadline earlier than the second's) re-sets it to the second's, not its own."""
    now = [1000.0]
    d = daemon(dataclasses.replace(config()), now)
    run(d, req(0x10, "192.0.2.1"))
    now[0] = 1300.0
    run(d, req(0x10, "192.0.2.2"))  # deadline 1900
    assert d.leases == {PREFIX: 1900.0}
    # Holder 1's deadline moves to 1850 by a shorter timeout (a reload shortened it).
    short = dataclasses.replace(
        d.cfg, resources=MappingProxyType({**d.cfg.resources, 0x10: PortResource(
            0x10, 22, timeout=100, ipv4_prefix=24)})
    )  # fmt: skip
    d.cfg = short
    now[0] = 1750.0
    assert run(d, req(0x10, "192.0.2.1")) == [FwStatus.ACK]
    assert d.leases == {PREFIX: 1900.0} and kernel(d) == {PREFIX: 150}
    # The control: alone, the same short re-knock would set its own deadline.
    alone = daemon(short, [1750.0])
    run(alone, req(0x10, "192.0.2.1"))
    assert alone.leases == {PREFIX: 1850.0}


def test_revoke_removes_only_its_own_prefix_lease() -> None:
    d = daemon()
    run(d, req(0x10, "192.0.2.1"), req(0x10, "198.51.100.1"), req(0x14, "192.0.2.1"))
    other = PortLease(ipaddress.ip_network("198.51.100.0/24"), "tcp", 22)
    assert set(kernel(d)) == {PREFIX, other, PortLease(A1, "tcp", 443)}
    assert run(d, req(0x10, "192.0.2.200", op=FwOp.REVOKE)) == [FwStatus.ACK]
    # 192.0.2.200 held nothing: the holder 192.0.2.1 keeps the /24 (holders are exact).
    assert set(kernel(d)) == {PREFIX, other, PortLease(A1, "tcp", 443)}
    assert run(d, req(0x10, "192.0.2.1", op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert set(kernel(d)) == {other, PortLease(A1, "tcp", 443)}


def test_after_a_restart_a_revoke_closes_the_lease_it_cannot_attribute() -> None:
    """Holders are in memory: a kernel element found at start-up has an unknown holder,
    which a revoke drops too (the revoker may be who knocked before the restart)."""
    d = daemon()
    kernel(d)[PREFIX] = 300
    d.load()
    assert d.stats["holders"] == 1
    assert run(d, req(0x10, "192.0.2.9", op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert kernel(d) == {}
    # A holder that knocked after the restart is tracked again.
    kernel(d)[PREFIX] = 300
    d.load()
    run(d, req(0x10, "192.0.2.2"))
    run(d, req(0x10, "192.0.2.3", user=USER2))
    run(d, req(0x10, "192.0.2.2", op=FwOp.REVOKE))  # drops .2 and the unknown holder
    assert set(kernel(d)) == {PREFIX}


def test_the_cap_counts_holders() -> None:
    """Each (user, address) holding an element counts: the holder table stays bounded by
    max-nr-rules even for a /64 (2**64 addresses); a refresh needs no new room."""
    d = daemon(config(max_nr_rules=2))
    statuses = run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2"), req(0x10, "192.0.2.3"))
    assert statuses == [FwStatus.ACK, FwStatus.ACK, FwStatus.LIMIT]
    assert run(d, req(0x10, "192.0.2.2")) == [FwStatus.ACK]  # refresh
    assert len(kernel(d)) == 1 and d.live_count() == 2
    run(d, req(0x10, "192.0.2.1", op=FwOp.REVOKE))
    assert run(d, req(0x10, "192.0.2.3")) == [FwStatus.ACK]


def test_metrics_show_wide_leases_and_holders() -> None:
    d = daemon()
    run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2", user=USER2), req(0x14), req(0x11))
    text = metrics.render(d.metric_families())
    assert "\nfastknockfwd_leases 3\n" in text  # /24 . 22, 192.0.2.1 . 443, the range
    assert "\nfastknockfwd_wide_leases 2\n" in text
    assert "\nfastknockfwd_lease_holders 4\n" in text


def test_a_range_lease_counts_one_per_protocol() -> None:
    d = daemon(config(max_nr_rules=1))
    assert run(d, req(0x11)) == [FwStatus.ACK]  # 1001 ports, one element
    assert run(d, req(0x14)) == [FwStatus.LIMIT]


def test_holders_expire_and_the_element_follows_the_latest() -> None:
    now = [1000.0]
    d = daemon(now=now)
    run(d, req(0x10, "192.0.2.1"))
    now[0] = 1400.0
    run(d, req(0x10, "192.0.2.2"))
    now[0] = 1601.0  # holder 1 expired; the element lives on (holder 2 until 2000)
    d.prune_expired()
    assert d.stats["holders"] == 1 and d.leases == {PREFIX: 2000.0}
    now[0] = 2001.0  # the kernel has expired it
    d.prune_expired()
    assert d.leases == {} and d.live_count() == 0


def test_proven_addresses_are_the_exact_knockers() -> None:
    """The pre-filter exempts who proved a key: the knockers, never their /24."""
    d = daemon()
    run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2", user=USER2))
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    [change] = fw.batches[0]
    assert change == Change(PREFIX, True, 600, ((A1, 600), (A2, 600)))
    assert [a for a, _ in change.proven_sources()] == [A1, A2]


def _reshaped(d: Daemon, **kw: object) -> None:
    """As a reload does: resource 0x10 with other attributes."""
    res = dataclasses.replace(d.cfg.resources[0x10], **kw)  # type: ignore[type-var]
    d.cfg = dataclasses.replace(d.cfg, resources=MappingProxyType({**d.cfg.resources, 0x10: res}))


def test_a_knock_of_the_new_shape_replaces_an_overlapping_old_one() -> None:
    d = daemon()
    _reshaped(d, ipv4_prefix=16)
    run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2", user=USER2))
    old = PortLease(ipaddress.ip_network("192.0.0.0/16"), "tcp", 22)
    unrelated = PortLease(ipaddress.ip_network("198.51.0.0/16"), "tcp", 22)
    run(d, req(0x10, "198.51.100.1"))
    _reshaped(d, ipv4_prefix=24)  # the admin narrows it
    assert run(d, req(0x10, "192.0.2.1")) == [FwStatus.ACK]
    assert set(kernel(d)) == {PREFIX, unrelated}  # /16 replaced; the other /16 untouched
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    assert {(c.key, c.install) for c in fw.batches[-1]} == {(old, False), (PREFIX, True)}


def test_a_revoke_of_the_new_shape_releases_the_old_one() -> None:
    d = daemon()
    _reshaped(d, ipv4_prefix=16)
    run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2", user=USER2))
    old = PortLease(ipaddress.ip_network("192.0.0.0/16"), "tcp", 22)
    _reshaped(d, ipv4_prefix=24)
    assert run(d, req(0x10, "192.0.2.1", op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert set(kernel(d)) == {old} and d.stats["holders"] == 1  # USER2 still holds it
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    # Nothing asked of the kernel for the /24 it does not hold (an add could collide).
    assert all(c.key != PREFIX for c in fw.batches[-1])
    assert run(d, req(0x10, "192.0.2.2", user=USER2, op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert kernel(d) == {}


_KEYS = [PREFIX, PortLease(A1, "tcp", 443), PortLease(NET24, "udp", 60000, 61000),
         JumpLease(0x12, "forward", "MY-FWD", NET24)]  # fmt: skip
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["knock", "revoke", "expire", "prune", "load"]),
        st.integers(0, len(_KEYS) - 1),
        st.sampled_from([None, (USER, A1), (USER, A2), (USER2, A1)]),
        st.integers(1, 50),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_incremental_count_and_indexes_match_a_recount(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """``Holdings.count``, ``.wide`` and ``.held_by`` are kept as entries change: after any
    sequence of batches, prunes and reloads they equal a recount from scratch."""
    h, now = Holdings(), 1000.0
    for op, k, holder, n in ops:
        key = _KEYS[k]
        if op in ("knock", "revoke", "expire"):
            draft = Draft(h, now)
            if op == "knock" and holder is not None:
                draft.apply([Claim(key, holder, True, n)])
            elif op == "revoke" and holder is not None:
                draft.apply([Claim(key, holder, False)])
            else:
                draft.apply([Claim(key, None, False)])
            draft.commit(set())
        elif op == "prune":
            now += n
            h.prune(now)
        else:
            h.load([(x, now + n) for x in _KEYS[: n % len(_KEYS)]])
        assert h.count() == sum(len(e.holders) or 1 for e in h.entries.values())
        assert h.wide == {x for x in h.entries if isinstance(x, PortLease) and x.wide}
        by_holder: dict[object, set[object]] = {}
        for x, e in h.entries.items():
            for who in e.holders:
                by_holder.setdefault(who, set()).add(x)
        assert h.held_by == by_holder


def test_a_holder_moves_to_the_new_shape_and_its_revoke_closes_the_old_one() -> None:
    """Reload /24 -> /32: the holder's knock of the exact key releases its /24 hold (the
    other holder keeps the /24); reload /32 -> /24: a revoke of the /24 also closes the
    holder's old exact lease (a revoke must close what the holder still has open)."""
    d = daemon()
    run(d, req(0x10, "192.0.2.1"), req(0x10, "192.0.2.2", user=USER2))  # /24, two holders
    _reshaped(d, ipv4_prefix=32)
    assert run(d, req(0x10, "192.0.2.1")) == [FwStatus.ACK]
    exact = PortLease(A1, "tcp", 22)
    assert set(kernel(d)) == {PREFIX, exact}  # USER2 still holds the /24
    assert d.holdings.holders(PREFIX).keys() == {(USER2, A2)}
    assert run(d, req(0x10, "192.0.2.2", user=USER2)) == [FwStatus.ACK]  # moves too
    assert set(kernel(d)) == {exact, PortLease(A2, "tcp", 22)}  # the /24 is gone
    _reshaped(d, ipv4_prefix=24)
    assert run(d, req(0x10, "192.0.2.1", op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert set(kernel(d)) == {PortLease(A2, "tcp", 22)}  # 192.0.2.1's exact lease closed
    # The control: the other holder's old exact lease stays until its own revoke.
    assert run(d, req(0x10, "192.0.2.2", user=USER2, op=FwOp.REVOKE)) == [FwStatus.ACK]
    assert kernel(d) == {}


def test_jump_prefix_reshaped_moves_the_holder() -> None:
    d = daemon()
    run(d, req(0x12, "192.0.2.1"))
    old = JumpLease(0x12, "forward", "MY-FWD", NET24)
    assert set(kernel(d)) == {old}
    res = dataclasses.replace(d.cfg.resources[0x12], ipv4_prefix=16)  # type: ignore[type-var]
    d.cfg = dataclasses.replace(d.cfg, resources=MappingProxyType({**d.cfg.resources, 0x12: res}))
    run(d, req(0x12, "192.0.2.1"))
    assert set(kernel(d)) == {
        JumpLease(0x12, "forward", "MY-FWD", ipaddress.ip_network("192.0.0.0/16"))
    }
