"""The pre-filter cannot be filled, only cuts what the server could not absorb, and lets
proven sources pass first (issue 11); real kernel, namespaces this module creates.

``Firewall.setup`` installs the pre-filter in a server namespace; a plain UDP socket on the
control port counts what arrives per source; spoofed sources come from a raw socket in the
client namespace (``tests.spoof``). Each attack test runs its no-attack control first, in
the same namespaces. Bounds are burst + rate x the measured sending time (+2 s of slack):
correctness bounds, not performance thresholds.

- 70,000 spoofed IPv4 sources (and 70,000 IPv6 /64s), more than the old per-address sets
  held: afterwards a fresh flooding source is still limited and a legitimate source still
  gets everything through; the bucket sets never hold more than SLOTS entries.
- The /48 cap: many /64s of one /48 together get GROUP_FACTOR allowances; another /48 is
  untouched.
- A flood that spoofs a victim's address empties the victim's bucket: without the spare
  allowance the victim's own datagrams are cut (the attack, shown); with it they pass; and
  an address with a lease (proven) passes even with no spare at all.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from fastknock.firewall import prefilter
from fastknock.firewall.leases import Change, PortLease
from fastknock.firewall.runner import LibNftables
from tests import netns, spoof
from tests.test_prefilter_e2e import BURST, CFG, MSG, PORT, RATE, Receiver, firewall, send, setup

pytestmark = pytest.mark.e2e

SPOOFED = 70_000


@pytest.fixture
def pair() -> Iterator[netns.Pair]:
    netns.require()
    with netns.veth_pair() as p:
        netns.load_ruleset(p.server)
        spoof.static_neighbours(p)
        yield p


class Drain:
    """``Receiver.collect`` in a thread, so a big spoofed burst never overflows the socket."""

    def __init__(self, rx: Receiver, settle: float = 1.0) -> None:
        self.rx, self.settle = rx, settle
        self.by_src: Counter[str] = Counter()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.by_src, _ = self.rx.collect(self.settle)

    def join(self) -> Counter[str]:
        self._t.join()
        return self.by_src


def slot_entries(ns: str, name: str) -> int:
    out = json.loads(netns.nft(ns, "-j", "list", "set", "inet", "filter", name))["nftables"]
    body = next(i["set"] for i in out if "set" in i)
    return len(body.get("elem", []))


def counters(ns: str) -> dict[str, int]:
    return prefilter.parse_counters(
        netns.nft(ns, "-j", "list", "counters", "table", "inet", "filter")
    )


LEGIT = 10  # datagrams the legitimate source sends per flood_is_limited


def flood_is_limited(
    pair: netns.Pair, rx: Receiver, flooder: str, legit: str, v6: bool, floor: int = BURST
) -> None:
    """``flooder`` (spoofed, fresh) sends 3,000, ``legit`` (a real client address)
    ``LEGIT``; the flooder gets at least ``floor`` and at most its burst plus its rate. The
    legitimate source runs twice per test on one bucket (BURST 40, RATE 1/s), and after the
    70,000 spoofed sources its slot holds about one of them too (Poisson, 70,000 / 65,536),
    each taking a token, and the flooder may just have used the spare allowance. So LEGIT
    is 10, not 20: 20 and 20 left the second run short by a colliding source or two when
    the run was faster than the refill (seen once in CI: 18 of 20)."""
    dst = pair.server_v6 if v6 else pair.server_v4
    sp = spoof.Spoofer(pair.client, socket.AF_INET6 if v6 else socket.AF_INET)
    try:
        start = time.monotonic()
        for _ in range(3000):
            sp.send(flooder, 41000, dst, PORT, MSG)
        elapsed = time.monotonic() - start
    finally:
        sp.close()
    send(pair.client, legit, dst, [MSG] * LEGIT)
    by_src, _ = rx.collect()
    assert floor <= by_src[flooder] <= BURST + RATE * (elapsed + 2), by_src[flooder]
    assert by_src[legit] == LEGIT


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_fresh_flooder_is_limited_after_70000_spoofed_sources(pair: netns.Pair, v6: bool) -> None:
    setup(pair, CFG)
    rx = Receiver(pair.server)
    legit = pair.client_v6[1] if v6 else pair.client_v4[1]
    try:
        # Control: no spoofed sources yet.
        flood_is_limited(pair, rx, "fd99:1::1" if v6 else "198.18.0.1", legit, v6)
        # The attack: more spoofed sources (one datagram each) than the old sets held.
        srcs = spoof.sources6_64(SPOOFED) if v6 else spoof.sources4(SPOOFED)
        before = sum(n for k, n in counters(pair.server).items() if k.startswith("dropped_"))
        drain = Drain(rx)
        sp = spoof.Spoofer(pair.client, socket.AF_INET6 if v6 else socket.AF_INET)
        try:
            sp.send_many(srcs, pair.server_v6 if v6 else pair.server_v4, PORT, MSG)
        finally:
            sp.close()
        got = drain.join()
        # Each spoofed source is within its allowance and reaches the socket, one datagram
        # each, except those that hash to the control flooder's emptied slot (about 70,000 /
        # 65,536 of them, Poisson): the kernel counts those as dropped, nothing else is lost.
        dropped = sum(n for k, n in counters(pair.server).items() if k.startswith("dropped_"))
        assert set(got.values()) == {1} and len(got) + dropped - before == SPOOFED
        assert dropped - before <= 20
        slots = "fastknock_pf_slots6" if v6 else "fastknock_pf_slots4"
        # 70,000 sources in 65,536 slots: about 65,536 x (1 - e^-1.07) = 43,000 used.
        assert prefilter.SLOTS // 2 < slot_entries(pair.server, slots) <= prefilter.SLOTS
        # A fresh flooding source is still limited; a legitimate source still gets through.
        # (Its slot may have lent a few tokens to spoofed sources that share it.)
        flood_is_limited(pair, rx, "fd99:2::1" if v6 else "198.18.0.2", legit, v6, BURST - 15)
    finally:
        rx.close()


def test_an_ipv6_group_is_capped_and_another_group_is_not(pair: netns.Pair) -> None:
    setup(pair, CFG)
    rx = Receiver(pair.server)
    sp = spoof.Spoofer(pair.client, socket.AF_INET6)
    group = ipaddress.IPv6Network("fd55:1:1::/48")
    hosts = [
        str(next(group.subnets(new_prefix=64)).network_address + (i << 64) + 1) for i in range(64)
    ]
    try:
        # Control: one /64 of the group within its allowance gets everything.
        sp.send_many([hosts[0]] * (BURST - 5), pair.server_v6, PORT, MSG)
        by_src, _ = rx.collect()
        assert by_src[hosts[0]] == BURST - 5
        # 64 /64s of the group, each within its own allowance (30 < BURST), together over
        # the group's.
        start = time.monotonic()
        sp.send_many([h for h in hosts[1:] for _ in range(30)], pair.server_v6, PORT, MSG)
        elapsed = time.monotonic() - start
        send(pair.client, pair.client_v6[1], pair.server_v6, [MSG] * 20)  # another /48
        by_src, _ = rx.collect()
        group_total = sum(n for a, n in by_src.items() if ipaddress.ip_address(a) in group)
        g = prefilter.GROUP_FACTOR
        assert group_total <= g * BURST + g * RATE * (elapsed + 2)
        assert group_total < 63 * 30  # cut
        assert by_src[pair.client_v6[1]] == 20
        c = counters(pair.server)  # (two /64s may share a slot, ~3%: then some are "ip6")
        assert c["dropped_ip6group"] > 0
        assert c["dropped_ip6group"] + c["dropped_ip6"] == 63 * 30 - group_total
    finally:
        sp.close()
        rx.close()


def victim_gets(pair: netns.Pair, rx: Receiver, victim: str) -> tuple[int, int]:
    """A flood of 3,000 junk datagrams spoofing ``victim`` (random source ports), then the
    victim's own 20: (what of the victim's own port arrived, flood datagrams that arrived)."""
    sp = spoof.Spoofer(pair.client, socket.AF_INET)
    try:
        for i in range(3000):
            sp.send(victim, 2000 + i, pair.server_v4, PORT, MSG)
    finally:
        sp.close()
    own = []
    with netns.socket_in(pair.client, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((victim, 45000))
        for _ in range(20):
            s.sendto(MSG, (pair.server_v4, PORT))
    rx.sock.settimeout(0.3)
    flood = 0
    while True:
        try:
            _, addr = rx.sock.recvfrom(100)
        except TimeoutError:
            break
        if addr[1] == 45000:
            own.append(1)
        else:
            flood += 1
    return len(own), flood


def test_a_spoofed_victim_flood_is_absorbed_by_the_spare_and_proven_sources_pass(
    pair: netns.Pair,
) -> None:
    victim, other = pair.client_v4
    rx = Receiver(pair.server)
    try:
        # Control: no flood, the victim's 20 arrive.
        setup(pair, CFG)
        send(pair.client, victim, pair.server_v4, [MSG] * 20)
        assert rx.collect()[0][victim] == 20
        # The attack without a spare allowance: the flood empties the victim's bucket.
        setup(pair, CFG)
        own, flood = victim_gets(pair, rx, victim)
        assert own == 0 and flood <= BURST + 10 * RATE
        # With a spare allowance larger than the flood: everything passes.
        setup(pair, dataclasses.replace(CFG, prefilter_spare=10_000))
        before = counters(pair.server)
        own, flood = victim_gets(pair, rx, victim)
        assert own == 20 and flood == 3000
        c = counters(pair.server)
        assert c["spared_ip4"] - before["spared_ip4"] > 2900  # it was over its allowance
        assert c["dropped_ip4"] == before["dropped_ip4"]
        # No spare, but the victim holds a lease: proven, it passes before the buckets.
        with netns.entered(pair.server):
            runner = LibNftables()
            try:
                fw = firewall(CFG, runner)
                fw.setup()
                lease = PortLease(ipaddress.ip_address(victim), "tcp", 22)
                assert fw.apply([Change(lease, True, 30)]) == [None]
            finally:
                runner.close()
        own, flood = victim_gets(pair, rx, victim)
        assert own == 20 and flood == 3000
        # ... and an address without a lease is still limited.
        send(pair.client, other, pair.server_v4, [MSG] * (BURST + 500))
        assert rx.collect()[0][other] <= BURST + 10 * RATE
    finally:
        rx.close()


def test_the_spare_allowance_is_bounded_too(pair: netns.Pair) -> None:
    """prefilter-spare: its own bound (burst = one second of its rate); what is over both
    is dropped, and counted."""
    spare = 300
    setup(pair, dataclasses.replace(CFG, prefilter_spare=spare))
    rx = Receiver(pair.server)
    try:
        start = time.monotonic()
        send(pair.client, pair.client_v4[0], pair.server_v4, [MSG] * 3000)
        elapsed = time.monotonic() - start
        n = rx.collect()[0][pair.client_v4[0]]
        assert BURST + spare <= n <= BURST + spare + (RATE + spare) * (elapsed + 2)
        c = counters(pair.server)  # fresh namespace: they start at 0
        assert c["spared_ip4"] >= spare and c["dropped_ip4"] == 3000 - n
    finally:
        rx.close()
