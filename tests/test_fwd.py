"""fastknockfwd's request checks, batching and lease cap, against a fake firewall (no root).

The kernel side is covered by tests/test_nft.py and tests/test_fwd_e2e.py; here the
Daemon logic runs in memory with an explicit clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import threading
from types import MappingProxyType

import pytest

from fastknock import ipc
from fastknock.conf.config import Config, JumpResource, NftablesConfig, PortResource
from fastknock.firewall.daemon import Daemon, ServerAccount
from fastknock.firewall.holders import Claim
from fastknock.firewall.leases import Change, LiveLease, PortLease
from fastknock.firewall.nft import Firewall
from fastknock.ipc import FwOp, FwRequest, FwStatus

USER, USER2 = 0x12345678, 0x2
SUM = bytes(32)


def make_config(max_nr_rules: int = 100, family: str = "inet", **kw: object) -> Config:
    resources = {
        1: PortResource(1, 22),
        2: PortResource(2, 53, tcp=True, udp=True, timeout=30),
        3: PortResource(3, 0),  # letmein's parser refuses port 0; the daemon must too
        4: PortResource(4, 5800),
        5: PortResource(5, 80, users=frozenset({USER2})),
        6: JumpResource(6, input="MY-IN", forward="MY-FWD", forward_match_saddr=True),
    }
    return Config(
        source="<test>",
        checksum=SUM,
        nftables=NftablesConfig(
            chain_input="IN", family=family, max_nr_rules=max_nr_rules, timeout=600, **kw
        ),  # type: ignore[arg-type]
        keys=MappingProxyType({USER: bytes(32), USER2: bytes(32)}),
        resources=MappingProxyType(resources),
    )


class FakeFirewall(Firewall):
    """A Firewall whose transactions are recorded; ``gate`` holds the first one open."""

    def __init__(self, cfg: Config) -> None:
        assert cfg.nftables is not None
        super().__init__(cfg.nftables, runner=None, control_port=cfg.port)  # type: ignore[arg-type]
        self.batches: list[list[Change]] = []
        self.kernel: dict[object, float] = {}  # key -> timeout, as the kernel holds it
        self.gate: threading.Event | None = None
        self.fail: set[object] = set()

    def apply(self, changes: list[Change]) -> list[str | None]:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(changes)
        self.stats.transactions += 1
        for c in changes:
            if c.key in self.fail:
                continue
            if c.install:
                self.kernel[c.key] = c.timeout
            else:
                self.kernel.pop(c.key, None)
        return ["refused" if c.key in self.fail else None for c in changes]

    def scan(self) -> list[LiveLease]:
        return [LiveLease(k, t) for k, t in self.kernel.items()]  # type: ignore[arg-type]


def req(res: int, addr: str = "192.0.2.1", op: FwOp = FwOp.INSTALL, **kw: object) -> FwRequest:
    fields: dict[str, object] = {"user": USER, "checksum": SUM, **kw}
    sent = FwRequest(op, fields["user"], res, ipaddress.ip_address(addr), fields["checksum"])  # type: ignore[arg-type]
    return ipc.decode_request(ipc.encode_request(sent))  # what the daemon gets: normalised


def daemon(cfg: Config | None = None, now: list[float] | None = None) -> Daemon:
    cfg = cfg or make_config()
    clock = now or [1000.0]
    return Daemon(cfg, FakeFirewall(cfg), ServerAccount(1, 1), clock=lambda: clock[0])


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (req(1, checksum=b"\1" * 32), FwStatus.BAD_CHECKSUM),
        (req(1, "0.0.0.0"), FwStatus.BAD_ADDRESS),
        (req(1, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), FwStatus.BAD_ADDRESS),
        (req(9), FwStatus.UNKNOWN_RESOURCE),
        (req(1, user=0x77), FwStatus.USER_NOT_ALLOWED),
        (req(5), FwStatus.USER_NOT_ALLOWED),
        (req(3), FwStatus.BAD_PORT),
        (req(4), FwStatus.BAD_PORT),
        (req(6), FwStatus.FIREWALL_ERROR),  # needs chain-forward, which is not configured
    ],
)
def test_refusals(request_: FwRequest, status: FwStatus) -> None:
    assert daemon().validate(request_) == status


@pytest.mark.parametrize(
    "addr",
    ["224.0.0.1", "239.255.255.250", "255.255.255.255", "ff02::1", "ff05::1:3",
     "::ffff:224.0.0.251"],
)  # fmt: skip
def test_multicast_and_broadcast_refused(addr: str) -> None:
    """A lease for a group or broadcast address would open the port to every sender that
    spoofs it: refused, in both families (also IPv4-mapped)."""
    assert daemon().validate(req(1, addr)) == FwStatus.BAD_ADDRESS


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1", "192.0.2.1", "2001:db8::1", "10.0.0.255"])
def test_unicast_and_loopback_still_allowed(addr: str) -> None:
    """The control: unicast and loopback (the tests use it) get their changes."""
    assert isinstance(daemon().validate(req(1, addr)), list)


def test_changes_per_resource() -> None:
    d = daemon()
    a9, a1 = ipaddress.IPv4Address("192.0.2.9"), ipaddress.IPv4Address("192.0.2.1")
    changes = d.validate(req(2, "::ffff:192.0.2.9"))
    assert changes == [
        Claim(PortLease(a9, "tcp", 53), (USER, a9), True, 30),
        Claim(PortLease(a9, "udp", 53), (USER, a9), True, 30),
    ]
    assert d.validate(req(1, op=FwOp.REVOKE)) == [
        Claim(PortLease(a1, "tcp", 22), (USER, a1), False, 600)
    ]


def test_family_ip_refuses_ipv6() -> None:
    d = daemon(make_config(family="ip"))
    assert d.validate(req(1, "2001:db8::1")) == FwStatus.BAD_ADDRESS
    assert isinstance(d.validate(req(1, "192.0.2.1")), list)


def test_jump_leases_per_chain() -> None:
    cfg = make_config(chain_forward="FWD")
    changes = daemon(cfg).validate(req(6))
    assert isinstance(changes, list)
    assert [(c.key.hook, c.key.addr) for c in changes] == [  # type: ignore[union-attr]
        ("input", None),
        ("forward", ipaddress.IPv4Address("192.0.2.1")),
    ]


async def _gather(d: Daemon, reqs: list[FwRequest]) -> list[FwStatus]:
    return list(await asyncio.gather(*(d.submit(r) for r in reqs)))


def test_requests_queued_behind_a_transaction_share_the_next_one() -> None:
    d = daemon()
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    fw.gate = threading.Event()

    async def run() -> list[FwStatus]:
        first = asyncio.ensure_future(d.submit(req(1, "192.0.2.1")))
        await asyncio.sleep(0.05)  # the first transaction is now in flight (gated)
        rest = [asyncio.ensure_future(d.submit(req(1, f"192.0.2.{i}"))) for i in range(2, 52)]
        await asyncio.sleep(0.05)
        assert fw.gate is not None
        fw.gate.set()
        return [await first, *[await r for r in rest]]

    assert asyncio.run(run()) == [FwStatus.ACK] * 51
    assert [len(b) for b in fw.batches] == [1, 50]
    assert d.stats["transactions"] == 2 and d.stats["requests"] == 51
    assert d.stats["live"] == 51


def test_requests_past_their_deadline_change_nothing() -> None:
    """A request whose deadline passed gets EXPIRED and no change: on arrival, and when it
    waited behind a transaction until after its requester gave up (the stalled-fwd case).
    The control: requests within their deadline in the same run are applied."""
    mono = [10_000]
    d = daemon()
    d.mono_ms = lambda: mono[0]
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    fw.gate = threading.Event()

    def at(addr: str, deadline: int) -> FwRequest:
        return dataclasses.replace(req(1, addr), deadline_ms=deadline)

    async def run() -> list[FwStatus]:
        late = await d.submit(at("192.0.2.9", 10_000))  # due now: refused on arrival
        first = asyncio.ensure_future(d.submit(at("192.0.2.1", 20_000)))
        await asyncio.sleep(0.05)  # in flight (gated)
        queued = asyncio.ensure_future(d.submit(at("192.0.2.2", 15_000)))  # fine on arrival
        control = asyncio.ensure_future(d.submit(at("192.0.2.3", 30_000)))
        await asyncio.sleep(0.05)
        mono[0] = 16_000  # the queued request's sender gave up while we were busy
        assert fw.gate is not None
        fw.gate.set()
        return [late, await first, await queued, await control]

    assert asyncio.run(run()) == [FwStatus.EXPIRED, FwStatus.ACK, FwStatus.EXPIRED, FwStatus.ACK]
    applied = {str(c.key.addr) for batch in fw.batches for c in batch}  # type: ignore[union-attr]
    assert applied == {"192.0.2.1", "192.0.2.3"}
    assert d.counts["status_expired"] == 2


def test_same_lease_twice_in_a_batch_is_one_change_and_last_wins() -> None:
    d = daemon()
    reqs = [req(1), req(1), req(1, op=FwOp.REVOKE), req(2)]
    assert asyncio.run(_gather(d, reqs)) == [FwStatus.ACK] * 4
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    changes = [c for b in fw.batches for c in b]
    assert len(changes) == 3  # 22/tcp once (revoked), 53/tcp, 53/udp
    assert not changes[0].install


def test_cap_counts_entries_and_rereads_the_kernel() -> None:
    now = [1000.0]
    d = daemon(make_config(max_nr_rules=3), now)
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    assert asyncio.run(_gather(d, [req(2, "192.0.2.1")])) == [FwStatus.ACK]  # counts 2
    statuses = asyncio.run(_gather(d, [req(1, "192.0.2.2"), req(1, "192.0.2.3")]))
    assert statuses == [FwStatus.ACK, FwStatus.LIMIT]
    assert asyncio.run(_gather(d, [req(1, "192.0.2.2")])) == [FwStatus.ACK]  # refresh
    # The kernel says an admin flushed everything: the cap check re-reads it.
    fw.kernel.clear()
    assert asyncio.run(_gather(d, [req(1, "192.0.2.3")])) == [FwStatus.ACK]
    # Port leases expire by the clock (the kernel removes them) and free room.
    now[0] += 601
    assert d.live_count() == 1  # expired, not yet forgotten: pruning is explicit
    d.prune_expired()
    assert d.live_count() == 0


def test_failed_change_nacks_only_its_requests() -> None:
    d = daemon()
    fw = d.fw
    assert isinstance(fw, FakeFirewall)
    fw.fail = {PortLease(ipaddress.IPv4Address("192.0.2.2"), "tcp", 22)}
    statuses = asyncio.run(_gather(d, [req(1, "192.0.2.1"), req(1, "192.0.2.2")]))
    assert statuses == [FwStatus.ACK, FwStatus.FIREWALL_ERROR]
    assert d.stats["live"] == 1


def test_jump_leases_expire_through_the_sweeper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastknock.firewall.daemon.SWEEP_INTERVAL", 0.01)
    now = [1000.0]
    d = daemon(make_config(chain_forward="FWD"), now)
    fw = d.fw
    assert isinstance(fw, FakeFirewall)

    async def run() -> None:
        assert await d.submit(req(6)) == FwStatus.ACK
        sweeper = asyncio.ensure_future(d.sweep())
        await asyncio.sleep(0.05)
        assert len(fw.batches) == 1  # not due yet
        now[0] += 601
        await asyncio.sleep(0.05)
        sweeper.cancel()
        await d.drain()

    asyncio.run(run())
    assert len(fw.batches) == 2 and not any(c.install for c in fw.batches[1])
    assert d.leases == {}
