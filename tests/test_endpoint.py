"""The sans-I/O endpoint (``knockd.endpoint``) with an explicit clock: no sockets, no loop.

A real client state machine (``protocol.ClientSession``) talks to the endpoint in memory;
the firewall is answered by the test through ``firewall_done``.
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from fastknock.conf.config import ErrorPolicy, PortResource
from fastknock.knockd.counters import Count
from fastknock.knockd.endpoint import (
    MAX_QUEUED,
    AskFirewall,
    Endpoint,
    SendDatagram,
    StreamClose,
    StreamWrite,
)
from fastknock.knockd.limits import Limits
from fastknock.knockd.peer import key_of, key_of_ip
from fastknock.mac import HmacKey, KeyRing
from fastknock.message import Operation
from fastknock.protocol import ClientSession, ServerSettings

USER = 0x00000001
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
RES = 0x00000022
TIMEOUT = 5.0


def settings(policy: ErrorPolicy = ErrorPolicy.BASIC_AUTH, res: int = RES) -> ServerSettings:
    return ServerSettings(
        keyring=KeyRing({USER: KEY}),
        resources={res: PortResource(res, 22)},
        control_port=5800,
        policy=policy,
        timeout=TIMEOUT,
    )


def endpoint(policy: ErrorPolicy = ErrorPolicy.BASIC_AUTH, total: int = 64, per: int = 8):
    ep = Endpoint(settings(policy), Limits(total, per), os.urandom)
    seen: list[tuple[bytes, bool]] = []
    ep.watch(lambda key, live: seen.append((key, live)))
    return ep, seen


def client(op: Operation = Operation.KNOCK, res: int = RES) -> ClientSession:
    return ClientSession(HmacKey(KEY), USER, res, op, os.urandom)


def addr(host: str = "192.0.2.1", port: int = 4000) -> tuple:
    return (host, port)


def one(actions: list, kind: type) -> object:
    assert [type(a) for a in actions] == [kind], actions
    return actions[0]


def test_udp_knock_end_to_end_in_memory() -> None:
    ep, seen = endpoint()
    c, a = client(), addr()
    key = key_of(a)
    ep.receive_datagram(c.start(), key, a, 0.0)
    challenge = one(ep.actions(), SendDatagram)
    assert challenge.addr == a and ep.udp_peers == 1 and seen == [(key, True)]
    ep.receive_datagram(c.receive(challenge.data).send, key, a, 1.0)
    ask = one(ep.actions(), AskFirewall)
    assert ask.request.operation is Operation.KNOCK and str(ask.request.peer) == "192.0.2.1"
    assert ask.deadline == 1.0 + TIMEOUT
    ep.firewall_done(ask.ticket, True, 1.5)
    comein = one(ep.actions(), SendDatagram)
    assert c.receive(comein.data).done
    assert ep.udp_peers == 0 and ep.limits.total == 0 and seen[-1] == (key, False)
    assert ep.counters[Count.KNOCKED] == 1 and ep.counters[Count.OUTCOME_OK] == 1
    assert ep.counters[Count.RECEIVED] == 2 and ep.counters[Count.SESSIONS] == 1
    assert ep.next_timer() is None


def test_deadline_is_exact_and_frees_the_slot() -> None:
    ep, seen = endpoint()
    a = addr()
    ep.receive_datagram(client().start(), key_of(a), a, 10.0)
    ep.actions()
    assert ep.next_timer() == 10.0 + TIMEOUT
    ep.handle_timer(10.0 + TIMEOUT - 0.001)
    assert ep.udp_peers == 1 and ep.actions() == []
    ep.handle_timer(10.0 + TIMEOUT)
    assert ep.udp_peers == 0 and ep.limits.total == 0
    assert ep.counters[Count.OUTCOME_TIMEOUT] == 1 and ep.next_timer() is None
    goaway = one(ep.actions(), SendDatagram)  # the session had passed basic auth
    assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert seen[-1][1] is False


def test_retransmitted_knock_gets_the_same_challenge() -> None:
    ep, _ = endpoint()
    c, a = client(), addr()
    first = c.start()
    ep.receive_datagram(first, key_of(a), a, 0.0)
    ep.receive_datagram(first, key_of(a), a, 1.0)
    one_, two = ep.actions()
    assert one_ == two and ep.counters[Count.SESSIONS] == 1


def test_caps_in_all_and_per_source_refuse_the_newest() -> None:
    ep, _ = endpoint(total=3, per=2)
    knock = client().start()
    for port in (1, 2, 3):  # one IPv4 source: the third is over its cap
        ep.receive_datagram(knock, key_of(addr(port=port)), addr(port=port), 0.0)
    assert ep.udp_peers == 2 and ep.counters[Count.DROPPED_LIMITS] == 1
    # IPv6: one /56 is one source; another /56 is another
    for host in ("2001:db8:0:1::1", "2001:db8:0:2::1"):
        ep.receive_datagram(knock, key_of((host, 9, 0, 0)), (host, 9, 0, 0), 0.0)
    assert ep.udp_peers == 3 and ep.counters[Count.DROPPED_LIMITS] == 2  # the total binds
    ep.handle_timer(TIMEOUT)
    assert ep.udp_peers == 0 and ep.limits.total == 0 and ep.limits.sources == 0


def test_ipv6_sources_share_a_cap_per_56() -> None:
    ep, _ = endpoint(per=1)
    knock = client().start()
    a1, a2 = ("2001:db8:0:ff::1", 9, 0, 0), ("2001:db8:0:1::2", 9, 0, 0)
    ep.receive_datagram(knock, key_of(a1), a1, 0.0)
    ep.receive_datagram(knock, key_of(a2), a2, 0.0)
    assert ep.udp_peers == 1 and ep.counters[Count.DROPPED_LIMITS] == 1


def test_datagrams_queue_while_the_firewall_works() -> None:
    ep, _ = endpoint()
    c, a = client(), addr()
    key = key_of(a)
    ep.receive_datagram(c.start(), key, a, 0.0)
    response = c.receive(one(ep.actions(), SendDatagram).data).send
    ep.receive_datagram(response, key, a, 0.1)
    ask = one(ep.actions(), AskFirewall)
    for _ in range(MAX_QUEUED + 3):
        ep.receive_datagram(response, key, a, 0.2)
    (slot,) = ep.sessions()
    assert slot.busy and len(slot.queue) == MAX_QUEUED
    assert ep.counters[Count.DROPPED_QUEUE] == 3
    ep.firewall_done(ask.ticket, True, 0.3)
    assert isinstance(ep.actions()[0], SendDatagram)  # COMEIN; the queue dies with it
    assert ep.udp_peers == 0


def test_firewall_failure_and_timeout_during_the_request() -> None:
    ep, _ = endpoint(ErrorPolicy.ALWAYS)
    c, a = client(), addr()
    key = key_of(a)
    ep.receive_datagram(c.start(), key, a, 0.0)
    ep.receive_datagram(c.receive(ep.actions()[0].data).send, key, a, 1.0)
    ask = one(ep.actions(), AskFirewall)
    ep.handle_timer(1.0 + TIMEOUT)  # the firewall took too long: GOAWAY, slot freed
    goaway = one(ep.actions(), SendDatagram)
    assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert ep.udp_peers == 0 and ep.counters[Count.OUTCOME_TIMEOUT] == 1
    ep.firewall_done(ask.ticket, False, 7.0)  # the late answer changes nothing more
    assert ep.actions() == [] and ep.counters[Count.FIREWALL_ERRORS] == 1


def test_tcp_session_from_split_chunks() -> None:
    ep, seen = endpoint()
    c = client(Operation.REVOKE)
    key = key_of_ip(ipaddress.ip_address("2001:db8::5"), 40000)
    assert ep.tcp_connected(7, key, 0.0)
    first = c.start()
    ep.tcp_received(7, first[:10], 0.1)
    assert ep.actions() == []
    ep.tcp_received(7, first[10:], 0.2)
    write = one(ep.actions(), StreamWrite)
    assert write.conn == 7
    response = c.receive(write.data).send
    ep.tcp_received(7, response, 0.3)
    ask = one(ep.actions(), AskFirewall)
    assert ask.request.operation is Operation.REVOKE
    ep.firewall_done(ask.ticket, True, 0.4)
    comein, close = ep.actions()
    assert isinstance(comein, StreamWrite) and close == StreamClose(7)
    assert c.receive(comein.data).done and ep.counters[Count.REVOKED] == 1
    assert ep.tcp_connections == 0 and ep.limits.total == 0 and seen == []  # TCP: no reader


@pytest.mark.parametrize("policy", [ErrorPolicy.ALWAYS, ErrorPolicy.BASIC_AUTH])
def test_tcp_silent_peer_times_out(policy: ErrorPolicy) -> None:
    ep, _ = endpoint(policy)
    assert ep.tcp_connected(1, key_of(addr()), 0.0)
    ep.tcp_received(1, b"x" * 20, 0.5)  # part of a message only
    assert ep.next_timer() == TIMEOUT
    ep.handle_timer(TIMEOUT)
    actions = ep.actions()
    if policy is ErrorPolicy.ALWAYS:
        assert [type(x) for x in actions] == [StreamWrite, StreamClose]
    else:
        assert actions == [StreamClose(1)]
    assert ep.counters[Count.OUTCOME_TIMEOUT] == 1 and ep.tcp_connections == 0


def test_tcp_peer_that_hangs_up_during_the_firewall_request_is_still_counted() -> None:
    ep, _ = endpoint()
    c = client()
    assert ep.tcp_connected(3, key_of(addr()), 0.0)
    ep.tcp_received(3, c.start(), 0.0)
    ep.tcp_received(3, c.receive(ep.actions()[0].data).send, 0.1)
    ask = one(ep.actions(), AskFirewall)
    ep.tcp_closed(3)
    assert ep.tcp_connections == 1  # kept until the firewall answers
    ep.firewall_done(ask.ticket, True, 0.2)
    assert ep.actions() == []  # nothing to write to a closed connection
    assert ep.counters[Count.KNOCKED] == 1 and ep.counters[Count.TCP_ABORTED] == 0
    assert ep.tcp_connections == 0 and ep.limits.total == 0


def test_tcp_refused_past_the_caps_and_aborted_counted() -> None:
    ep, _ = endpoint(total=1)
    assert ep.tcp_connected(1, key_of(addr()), 0.0)
    assert not ep.tcp_connected(2, key_of(addr("192.0.2.9")), 0.0)
    assert ep.counters[Count.DROPPED_LIMITS] == 1
    ep.tcp_closed(1)
    assert ep.counters[Count.TCP_ABORTED] == 1 and ep.limits.total == 0


def test_reload_applies_to_new_sessions_only() -> None:
    ep, _ = endpoint()
    old_client, a = client(), addr()
    ep.receive_datagram(old_client.start(), key_of(a), a, 0.0)
    challenge = ep.actions()[0].data
    ep.reload(settings(res=0x99))  # resource RES is gone for new sessions
    ep.receive_datagram(old_client.receive(challenge).send, key_of(a), a, 0.1)
    assert isinstance(one(ep.actions(), AskFirewall), AskFirewall)  # in flight: old rules
    b = addr(port=4001)
    ep.receive_datagram(client().start(), key_of(b), b, 0.2)
    goaway = one(ep.actions(), SendDatagram)
    assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert ep.counters[Count.OUTCOME_UNKNOWN_RESOURCE] == 1 and ep.udp_peers == 1


def test_shutdown_forgets_everything() -> None:
    ep, seen = endpoint()
    a = addr()
    ep.receive_datagram(client().start(), key_of(a), a, 0.0)
    assert ep.tcp_connected(5, key_of(addr("192.0.2.8")), 0.0)
    ep.actions()
    ep.shutdown()
    assert ep.actions() == [StreamClose(5)] and ep.counters[Count.TCP_CANCELLED] == 1
    assert ep.udp_peers == ep.tcp_connections == ep.limits.total == 0
    assert seen[-1] == (key_of(a), False)


def test_junk_and_forgeries_create_no_state() -> None:
    ep, seen = endpoint()
    forged = bytearray(client().start())
    forged[-1] ^= 1
    for data in (b"", b"x" * 55, bytes(56), os.urandom(56), bytes(forged)):
        ep.receive_datagram(data, key_of(addr()), addr(), 0.0)
    assert ep.actions() == [] and seen == [] and ep.limits.total == 0
    assert ep.counters[Count.OUTCOME_SIZE] == 2 and ep.counters[Count.OUTCOME_MAC] == 1
