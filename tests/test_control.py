"""fastknockd's transports in-process, on real loopback sockets, with a fake firewall.

Runs every test on asyncio and on uvloop (the ``loop_factory`` fixture). The end-to-end
tests with the real daemons and nftables are in test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from fastknock.conf.config import ErrorPolicy, PortResource
from fastknock.errors import KnockError
from fastknock.knock.client import Target, run_session
from fastknock.knockd.control import Controller, TcpProtocol, UdpProtocol
from fastknock.knockd.counters import Count
from fastknock.knockd.endpoint import Endpoint
from fastknock.knockd.limits import Limits, source_of
from fastknock.knockd.peer import key_of_ip
from fastknock.mac import HmacKey, KeyRing
from fastknock.message import Operation
from fastknock.protocol import FirewallRequest, ServerSettings

USER = 0x00000001
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
RES = 0x00000022


def _loops() -> list[Any]:
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop

        params.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:
        params.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    return params


@pytest.fixture(params=_loops())
def run(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    def runner(coro: Any) -> Any:
        loop = request.param()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    return runner


class FakeFirewall:
    def __init__(self, ok: bool = True, delay: float = 0.0) -> None:
        self.ok = ok
        self.delay = delay
        self.requests: list[FirewallRequest] = []

    async def __call__(self, request: FirewallRequest, timeout: float) -> bool:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        return self.ok


def make_controller(
    fw: FakeFirewall,
    policy: ErrorPolicy = ErrorPolicy.ALWAYS,
    max_sessions: int = 64,
    per_source: int = 8,
    timeout: float = 2.0,
) -> Controller:
    settings = ServerSettings(
        keyring=KeyRing({USER: KEY}),
        resources={RES: PortResource(RES, 22)},
        control_port=5800,
        policy=policy,
        timeout=timeout,
        users=(USER,),
    )
    return Controller(Endpoint(settings, Limits(max_sessions, per_source), os.urandom), fw)


async def udp_server(controller: Controller) -> tuple[Any, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: UdpProtocol(controller), local_addr=("127.0.0.1", 0)
    )
    return proto, transport.get_extra_info("sockname")[1]


async def tcp_server(controller: Controller) -> tuple[asyncio.base_events.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TcpProtocol(controller), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def knock(port: int, udp: bool, op: Operation = Operation.KNOCK, timeout: float = 2.0):
    target = Target("127.0.0.1", socket.AF_INET, port, udp)
    await asyncio.get_running_loop().run_in_executor(
        None, run_session, target, HmacKey(KEY), USER, RES, op, timeout
    )


async def until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (at most ``limit`` seconds) for ``cond``; the assertion that follows decides."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond() and loop.time() < end:
        await asyncio.sleep(0.01)


def _source(host: str, port: int = 1) -> bytes:
    return source_of(key_of_ip(ipaddress.ip_address(host), port))


def test_source_groups_ipv6_by_56_and_ipv4_per_address() -> None:
    a = _source("2001:db8:0:ff::1")
    b = _source("2001:db8:0:1::2", 2)
    c = _source("2001:db8:0:100::1")
    assert a == b != c
    assert _source("192.0.2.1") != _source("192.0.2.2")
    assert _source("192.0.2.1", 1) == _source("192.0.2.1", 2)


def test_limits() -> None:
    limits = Limits(max_total=3, max_per_source=2)
    a, b, c = (key_of_ip(ipaddress.ip_address(f"192.0.2.{i}"), 1) for i in (1, 2, 3))
    assert limits.acquire(a) and limits.acquire(a)
    assert not limits.acquire(a)  # per source
    assert limits.acquire(b)
    assert not limits.acquire(c)  # in all
    limits.release(a)
    assert limits.acquire(c)
    for p in (a, b, c):
        limits.release(p)
    assert (limits.total, limits.sources) == (0, 0)


@pytest.mark.parametrize("op", [Operation.KNOCK, Operation.REVOKE])
def test_udp_knock(run: Callable[[Any], Any], op: Operation) -> None:
    fw = FakeFirewall(delay=0.05)

    async def main() -> None:
        c = make_controller(fw)
        proto, port = await udp_server(c)
        await knock(port, udp=True, op=op)
        proto.close()
        assert c.counters[Count.KNOCKED if op is Operation.KNOCK else Count.REVOKED] == 1
        assert c.endpoint.udp_peers == 0 and c.endpoint.limits.total == 0

    run(main())
    assert [(r.operation, str(r.peer)) for r in fw.requests] == [(op, "127.0.0.1")]


def test_tcp_knock_and_firewall_failure(run: Callable[[Any], Any]) -> None:
    fw = FakeFirewall()

    async def main() -> None:
        c = make_controller(fw)
        server, port = await tcp_server(c)
        await knock(port, udp=False)
        fw.ok = False
        with pytest.raises(KnockError, match="GOAWAY"):
            await knock(port, udp=False)
        server.close()
        await server.wait_closed()
        await until(
            lambda: c.counters[Count.OUTCOME_FIREWALL] == 1
        )  # the handler may lag the client
        assert c.counters[Count.OUTCOME_OK] == 1 and c.counters[Count.OUTCOME_FIREWALL] == 1
        assert c.endpoint.limits.total == 0

    run(main())


def test_udp_session_times_out_and_frees_its_slot(run: Callable[[Any], Any]) -> None:
    """A KNOCK leaves nothing behind; a session starts with the RESPONSE and, with the
    firewall stalled past the control timeout, times out and frees its slot."""

    async def main() -> None:
        c = make_controller(FakeFirewall(delay=2.0), timeout=0.3)
        proto, port = await udp_server(c)
        from fastknock.protocol import ClientSession

        client = ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", port))
            s.send(client.start())
            challenge = await asyncio.wait_for(loop.sock_recv(s, 100), 2)
            assert c.endpoint.udp_peers == 0 and c.endpoint.limits.total == 0  # stateless
            response = client.receive(challenge).send
            assert response is not None
            s.send(response)
            await until(lambda: c.endpoint.udp_peers == 1)
            assert c.endpoint.limits.total == 1
            await asyncio.sleep(0.6)  # the firewall never answers in time
        assert c.endpoint.udp_peers == 0 and c.endpoint.limits.total == 0
        assert c.counters[Count.OUTCOME_TIMEOUT] == 1
        await c.close()  # the stalled firewall request is still pending: cancel it
        proto.close()

    run(main())


def test_udp_state_stays_empty_under_a_knock_replayed_from_many_ports(
    run: Callable[[Any], Any],
) -> None:
    """A valid KNOCK replayed from 3,000 source ports: every copy is answered with its
    computed CHALLENGE and none holds a slot; a legitimate knock still works (control:
    the same knock before the replay)."""

    async def main() -> None:
        c = make_controller(FakeFirewall(), max_sessions=64, per_source=8, timeout=5.0)
        proto, port = await udp_server(c)
        from fastknock.protocol import ClientSession

        await knock(port, udp=True)  # the no-attack control
        knock_bytes = ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom).start()
        peak = 0
        for _ in range(3000 // 50):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
            for s in socks:
                s.sendto(knock_bytes, ("127.0.0.1", port))
            await asyncio.sleep(0.005)
            peak = max(peak, c.endpoint.udp_peers, c.endpoint.limits.total)
            for s in socks:
                s.close()
        await until(lambda: c.counters[Count.CHALLENGES] >= 3000 + 1)
        assert peak == 0 and c.counters[Count.DROPPED_LIMITS] == 0
        await knock(port, udp=True)
        assert c.counters[Count.KNOCKED] == 2
        proto.close()

    run(main())


def test_udp_junk_creates_no_state_and_stealth_sends_nothing(run: Callable[[Any], Any]) -> None:
    async def main() -> None:
        c = make_controller(FakeFirewall(), policy=ErrorPolicy.BASIC_AUTH)
        proto, port = await udp_server(c)
        junk = [b"", b"x" * 55, b"x" * 57, b"\0" * 56, os.urandom(56)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            for data in junk:
                s.sendto(data, ("127.0.0.1", port))
            await asyncio.sleep(0.1)
            assert c.endpoint.udp_peers == 0 and c.endpoint.limits.total == 0
            with pytest.raises(socket.timeout):
                s.recv(100)
        proto.close()

    run(main())


def test_udp_datagrams_during_the_firewall_request_are_dropped(run: Callable[[Any], Any]) -> None:
    """Copies of the RESPONSE that arrive while the firewall works are unfit for the
    full-auth session: dropped and counted, one firewall request, the client gets COMEIN."""

    async def main() -> None:
        fw = FakeFirewall(delay=0.3)
        c = make_controller(fw)
        proto, port = await udp_server(c)
        from fastknock.protocol import ClientSession

        client = ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            s.connect(("127.0.0.1", port))
            s.send(client.start())
            challenge = await loop.sock_recv(s, 100)
            response = client.receive(challenge).send
            assert response is not None
            for _ in range(10):  # the RESPONSE, then 9 more copies while the firewall works
                s.send(response)
            await until(lambda: c.counters[Count.DROPPED_UNFIT] == 9)
            (state,) = c.endpoint.sessions()
            assert state.busy and c.counters[Count.DROPPED_UNFIT] == 9
            reply = await asyncio.wait_for(loop.sock_recv(s, 100), 2)
            assert client.receive(reply).done
        assert len(fw.requests) == 1
        proto.close()

    run(main())
