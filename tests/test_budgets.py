"""Session budgets (``knockd.limits`` and their use by the endpoint), explicit clock.

The lock-outs of issue 11 in memory: idle TCP connections, a captured KNOCK replayed over
TCP, and one site spreading over its /56s; each with a no-attack control.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import pytest

from fastknock.knockd.counters import Count
from fastknock.knockd.endpoint import AskFirewall, Endpoint, StreamClose, StreamWrite
from fastknock.knockd.limits import Budgets, Limits, describe, site_of, source_of
from fastknock.knockd.peer import key_of, key_of_ip
from tests.test_endpoint import TIMEOUT, client, next_deadline, settings


def key(host: str, port: int = 1000) -> bytes:
    return key_of_ip(ipaddress.ip_address(host), port)


def endpoint(**kw: int | float) -> Endpoint:
    return Endpoint(settings(), Budgets.default(**kw), os.urandom)  # type: ignore[arg-type]


def tcp_knock(ep: Endpoint, conn: int, k: bytes, now: float) -> bool:
    """A whole TCP knock on connection ``conn``; True if it got to the firewall and COMEIN."""
    if not ep.tcp_connected(conn, k, now):
        return False
    c = client()
    ep.tcp_received(conn, c.start(), now)
    writes = [a for a in ep.actions() if isinstance(a, StreamWrite) and a.conn == conn]
    if not writes:
        return False
    ep.tcp_received(conn, c.receive(writes[0].data).send, now)
    asks = [a for a in ep.actions() if isinstance(a, AskFirewall)]
    if not asks:
        return False
    ep.firewall_done(asks[0].ticket, True, now)
    out = ep.actions()
    return any(isinstance(a, StreamWrite) and c.receive(a.data).done for a in out)


def test_sources_and_sites() -> None:
    assert source_of(key("192.0.2.1")) == source_of(key("192.0.2.1", 9))
    assert site_of(key("192.0.2.1")) is None
    a, b = key("2001:db8:1:100::1"), key("2001:db8:1:200::1")
    assert source_of(a) != source_of(b) and site_of(a) == site_of(b)
    assert describe(source_of(a)) == "2001:db8:1:100::/56"
    assert describe(source_of(key("192.0.2.7"))) == "192.0.2.7"


def test_limits_cap_per_site_across_its_56s() -> None:
    limits = Limits(max_total=100, max_per_source=2, max_per_site=5)
    site = [key(f"2001:db8:7:{i:x}00::1") for i in range(1, 5)]  # four /56s of one /48
    got = [limits.acquire(k) for k in site for _ in range(2)]
    assert got == [True] * 5 + [False] * 3
    assert limits.refusal(site[0]) == "source" and limits.refusal(site[3]) == "site"
    assert limits.acquire(key("2001:db8:8::1"))  # another /48
    for k in site:
        for _ in range(2):
            if limits.total:
                limits.release(k)


def test_idle_tcp_connections_do_not_starve_anyone() -> None:
    """16 addresses x 8 idle connections, reconnecting as soon as they are closed: legit
    TCP and UDP knocks from elsewhere still succeed. Control: the same knocks, no attack."""
    for attack in (False, True):
        ep = endpoint(preauth_max=32, preauth_per_source=4)
        conn = 0
        if attack:
            for i in range(16):
                for _ in range(8):
                    conn += 1
                    ep.tcp_connected(conn, key(f"198.51.100.{i}", conn), 0.0)
            ep.actions()
            assert ep.budgets.preauth.total == 32  # full, oldest evicted on demand
            assert ep.counters[Count.DROPPED_TCP_BUDGET] == 16 * 4  # per-source cap
        for n in range(10):
            conn += 1
            assert tcp_knock(ep, conn, key("203.0.113.5", 5000 + n), 0.1 + n / 100)
        assert ep.counters[Count.KNOCKED] == 10
        assert ep.budgets.tcp.total == 0


def test_preauth_deadline_is_short_then_the_control_timeout() -> None:
    ep = endpoint(preauth_timeout=1.0)
    assert ep.tcp_connected(1, key("192.0.2.1"), 0.0)
    assert next_deadline(ep) == 1.0
    ep.handle_timer(1.0)
    assert ep.actions() == [StreamClose(1)]
    assert ep.counters[Count.TCP_PREAUTH_DEADLINE] == 1 and ep.tcp_connections == 0
    assert ep.tcp_connected(2, key("192.0.2.1"), 5.0)
    ep.tcp_received(2, client().start(), 5.5)  # a valid first message: the control timeout
    ep.actions()
    assert next_deadline(ep) == 5.5 + TIMEOUT


def test_a_replayed_knock_over_tcp_cannot_fill_the_session_budget() -> None:
    """A captured KNOCK sent on many TCP connections passes basic auth, but its
    connections stay in the pre-auth budget (they never prove the key) and are evicted
    oldest first; a key holder's knock still gets through and the TCP budget stays free."""
    ep = endpoint(preauth_max=16, preauth_per_source=4, max_sessions=4, max_per_source=2)
    captured = client().start()
    conn = 0
    for i in range(40):
        for _ in range(4):
            conn += 1
            if ep.tcp_connected(conn, key(f"198.51.100.{i}", conn), 0.0):
                ep.tcp_received(conn, captured, 0.0)
    ep.actions()
    assert ep.budgets.tcp.total == 0 and ep.budgets.preauth.total == 16
    assert ep.counters[Count.TCP_PREAUTH_EVICTED] > 100
    assert tcp_knock(ep, conn + 1, key("203.0.113.9"), 0.5)


def test_authenticated_tcp_sessions_hold_the_tcp_budget_only() -> None:
    ep = endpoint(max_sessions=1, max_per_source=1)
    c = client()
    assert ep.tcp_connected(1, key("192.0.2.1"), 0.0)
    ep.tcp_received(1, c.start(), 0.0)
    challenge = ep.actions()[0]
    ep.tcp_received(1, c.receive(challenge.data).send, 0.0)  # type: ignore[union-attr]
    assert isinstance(ep.actions()[0], AskFirewall)
    assert ep.budgets.tcp.total == 1 and ep.budgets.preauth.total == 0
    other = client()
    assert ep.tcp_connected(2, key("192.0.2.2"), 0.0)
    ep.tcp_received(2, other.start(), 0.0)
    challenge = ep.actions()[0]
    ep.tcp_received(2, other.receive(challenge.data).send, 0.0)  # type: ignore[union-attr]
    assert ep.actions() == [StreamClose(2)]  # the TCP budget (-n 1) is full
    assert ep.counters[Count.DROPPED_LIMITS] == 1


def test_udp_and_tcp_budgets_are_separate() -> None:
    ep = endpoint(max_sessions=1, max_per_source=1)
    assert ep.tcp_connected(1, key("192.0.2.1"), 0.0)
    c, a = client(), ("192.0.2.1", 4000)
    ep.receive_datagram(c.start(), key_of(a), a, 0.0)
    ep.receive_datagram(c.receive(ep.actions()[0].data).send, key_of(a), a, 0.0)  # type: ignore[union-attr]
    assert isinstance(ep.actions()[0], AskFirewall)


def test_a_cap_warns_once_a_minute_naming_the_top_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ep = endpoint(preauth_per_source=1)
    caplog.set_level(logging.WARNING, "fastknockd")
    for i in range(5):
        ep.tcp_connected(2 * i, key("192.0.2.66"), float(i))
        ep.tcp_connected(2 * i + 1, key("192.0.2.66"), float(i))
    ep.tcp_connected(99, key("192.0.2.66"), 61.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "tcp-preauth-source" in warnings[0] and "192.0.2.66" in warnings[0]
    assert all("80E9C81D" not in w for w in warnings)  # never a key
