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
    AskFirewall,
    Endpoint,
    SendDatagram,
    StreamClose,
    StreamWrite,
)
from fastknock.knockd.limits import Budgets, Limits
from fastknock.knockd.peer import key_of, key_of_ip
from fastknock.knockd.replaycap import PEERS
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


def next_deadline(ep: Endpoint) -> float:
    """The earliest session deadline (``next_timer`` may be a secret rotation first)."""
    return min(slot.deadline for slot in ep.sessions())


def one(actions: list, kind: type) -> object:
    assert [type(a) for a in actions] == [kind], actions
    return actions[0]


def knock_udp(ep: Endpoint, c: ClientSession, a: tuple, now: float = 0.0) -> AskFirewall:
    """KNOCK -> computed CHALLENGE -> RESPONSE: returns the firewall request."""
    ep.receive_datagram(c.start(), key_of(a), a, now)
    challenge = one(ep.actions(), SendDatagram)
    assert challenge.addr == a
    ep.receive_datagram(c.receive(challenge.data).send, key_of(a), a, now + 0.5)
    return one(ep.actions(), AskFirewall)


def test_udp_knock_end_to_end_in_memory() -> None:
    ep, seen = endpoint()
    c, a = client(), addr()
    key = key_of(a)
    ep.receive_datagram(c.start(), key, a, 0.0)
    challenge = one(ep.actions(), SendDatagram)
    # Stateless: a CHALLENGE went out, and nothing at all is kept for the peer.
    assert ep.udp_peers == 0 and ep.limits.total == 0 and seen == []
    assert ep.counters[Count.CHALLENGES] == 1 and ep.counters[Count.SESSIONS] == 0
    ep.receive_datagram(c.receive(challenge.data).send, key, a, 1.0)
    ask = one(ep.actions(), AskFirewall)
    assert ask.request.operation is Operation.KNOCK and str(ask.request.peer) == "192.0.2.1"
    assert ask.deadline == 1.0 + TIMEOUT and seen == [(key, True)] and ep.udp_peers == 1
    ep.firewall_done(ask.ticket, True, 1.5)
    comein = one(ep.actions(), SendDatagram)
    assert c.receive(comein.data).done
    assert ep.udp_peers == 0 and ep.limits.total == 0 and seen[-1] == (key, False)
    assert ep.counters[Count.KNOCKED] == 1 and ep.counters[Count.OUTCOME_OK] == 1
    assert ep.counters[Count.RECEIVED] == 2 and ep.counters[Count.SESSIONS] == 1


def test_revoke_token_does_not_answer_for_a_knock() -> None:
    """The token binds the operation: a REVOKE's RESPONSE asks for a revoke."""
    ep, _ = endpoint()
    ask = knock_udp(ep, client(Operation.REVOKE), addr())
    assert ask.request.operation is Operation.REVOKE


def test_a_replayed_knock_from_many_addresses_holds_no_slot() -> None:
    """The lock-out of issue 10: one captured KNOCK from 5,000 sources. Nothing is kept for
    any copy, and only the first ``PEERS`` get their computed CHALLENGE (the answer cap),
    so a legitimate knock afterwards (and during) goes through; the no-attack control is
    the same knock on a fresh endpoint."""
    for attack in (False, True):
        ep, seen = endpoint(total=64, per=8)
        captured = client().start()
        if attack:
            for i in range(5000):
                host = f"10.{i // 250}.{i % 250}.1"
                ep.receive_datagram(captured, key_of((host, 1000 + i)), (host, 1000 + i), 1.0)
            assert ep.counters[Count.CHALLENGES] == PEERS and len(ep.actions()) == PEERS
            assert ep.counters[Count.KNOCK_REPLAY_CAPPED] == 5000 - PEERS
        assert ep.udp_peers == 0 and ep.limits.total == 0 and seen == []
        ask = knock_udp(ep, client(), addr("192.0.2.77"), 2.0)
        ep.firewall_done(ask.ticket, True, 2.6)
        ep.actions()
        assert ep.counters[Count.KNOCKED] == 1


def test_caps_count_authenticated_sessions_only() -> None:
    ep, _ = endpoint(total=3, per=2)
    asks = [knock_udp(ep, client(), addr(port=p)) for p in (1, 2)]
    c3, a3 = client(), addr(port=3)  # same IPv4 source: over its cap of 2
    ep.receive_datagram(c3.start(), key_of(a3), a3, 0.0)
    response = c3.receive(one(ep.actions(), SendDatagram).data).send
    ep.receive_datagram(response, key_of(a3), a3, 0.1)
    assert ep.actions() == [] and ep.counters[Count.DROPPED_LIMITS] == 1
    for ask in asks:
        ep.firewall_done(ask.ticket, True, 0.2)
    ep.actions()
    ep.receive_datagram(response, key_of(a3), a3, 0.3)  # the token was not spent: retry works
    assert isinstance(one(ep.actions(), AskFirewall), AskFirewall)


def test_ipv6_sources_share_a_cap_per_56() -> None:
    ep, _ = endpoint(per=1)
    a1, a2 = ("2001:db8:0:ff::1", 9, 0, 0), ("2001:db8:0:1::2", 9, 0, 0)
    knock_udp(ep, client(), a1)
    c2 = client()
    ep.receive_datagram(c2.start(), key_of(a2), a2, 0.0)
    ep.receive_datagram(c2.receive(ep.actions()[0].data).send, key_of(a2), a2, 0.1)
    assert ep.udp_peers == 1 and ep.counters[Count.DROPPED_LIMITS] == 1


def test_unfit_datagrams_never_disturb_an_authenticated_session() -> None:
    """Junk, a replayed RESPONSE or a KNOCK with the session's (spoofable) address and port
    while its firewall request is in flight: dropped and counted; the session completes."""
    ep, _ = endpoint(ErrorPolicy.ALWAYS)
    c, a = client(), addr()
    ask = knock_udp(ep, c, a)
    for data in (os.urandom(56), bytes(56), client().start(), c.first):
        ep.receive_datagram(data, key_of(a), a, 0.7)
    assert ep.actions() == [] and ep.counters[Count.DROPPED_UNFIT] == 4
    ep.firewall_done(ask.ticket, True, 0.8)
    assert c.receive(one(ep.actions(), SendDatagram).data).done
    assert ep.counters[Count.KNOCKED] == 1


def test_a_replayed_response_changes_the_firewall_once() -> None:
    ep, _ = endpoint(ErrorPolicy.ALWAYS)
    c, a = client(), addr()
    ep.receive_datagram(c.start(), key_of(a), a, 0.0)
    response = c.receive(one(ep.actions(), SendDatagram).data).send
    ep.receive_datagram(response, key_of(a), a, 0.1)
    ep.firewall_done(one(ep.actions(), AskFirewall).ticket, True, 0.2)
    ep.actions()
    for when in (0.3, 3.0):  # the same bytes again, later, after the session ended
        ep.receive_datagram(response, key_of(a), a, when)
        goaway = one(ep.actions(), SendDatagram)  # policy always: a GOAWAY, no firewall
        assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert ep.counters[Count.OUTCOME_REPLAY] == 2 and ep.counters[Count.KNOCKED] == 1


def test_firewall_failure_and_timeout_during_the_request() -> None:
    ep, _ = endpoint(ErrorPolicy.ALWAYS)
    ask = knock_udp(ep, client(), addr(), 1.0)
    ep.handle_timer(1.5 + TIMEOUT)  # the firewall took too long: GOAWAY, slot freed
    goaway = one(ep.actions(), SendDatagram)
    assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert ep.udp_peers == 0 and ep.counters[Count.OUTCOME_TIMEOUT] == 1
    ep.firewall_done(ask.ticket, False, 7.0)  # the late answer changes nothing more
    assert ep.actions() == [] and ep.counters[Count.FIREWALL_ERRORS] == 1


def test_next_timer_is_the_next_secret_rotation_when_idle() -> None:
    ep, _ = endpoint()
    ep.handle_timer(100.0)
    assert ep.next_timer() == ep.challenger.next_rotation
    assert 100.0 < ep.next_timer() <= 100.0 + TIMEOUT


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
    assert next_deadline(ep) == 1.0  # the pre-auth deadline
    ep.handle_timer(1.0)
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


def test_tcp_full_preauth_budget_evicts_the_oldest_and_aborted_counted() -> None:
    ep = Endpoint(settings(), Budgets.default(preauth_max=1), os.urandom)
    assert ep.tcp_connected(1, key_of(addr()), 0.0)
    assert ep.tcp_connected(2, key_of(addr("192.0.2.9")), 0.0)
    assert ep.actions() == [StreamClose(1)]
    assert ep.counters[Count.TCP_PREAUTH_EVICTED] == 1
    ep.tcp_closed(2)
    assert ep.counters[Count.TCP_ABORTED] == 1 and ep.budgets.active == 0


def test_reload_applies_to_new_sessions_only() -> None:
    ep, _ = endpoint()
    ask = knock_udp(ep, client(), addr())
    ep.reload(settings(res=0x99))  # resource RES is gone for new knocks
    ep.firewall_done(ask.ticket, True, 1.0)  # in flight: finishes on the old rules
    assert ep.counters[Count.KNOCKED] == 1
    ep.actions()
    b = addr(port=4001)
    ep.receive_datagram(client().start(), key_of(b), b, 1.2)
    goaway = one(ep.actions(), SendDatagram)
    assert int.from_bytes(goaway.data[4:8], "big") == Operation.GOAWAY
    assert ep.counters[Count.OUTCOME_UNKNOWN_RESOURCE] == 1 and ep.udp_peers == 0


def test_shutdown_forgets_everything() -> None:
    ep, seen = endpoint()
    a = addr()
    knock_udp(ep, client(), a)
    assert ep.tcp_connected(5, key_of(addr("192.0.2.8")), 0.0)
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
