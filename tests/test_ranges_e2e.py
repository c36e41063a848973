"""End to end: prefix opens and port ranges (issue 15) through both real daemons.

A veth pair (tests/netns.py) whose client side also holds an address in *another* /24 and
/64 (10.77.1.2, fd77:0:0:1::2; the server routes them back over the veth), letmein's
ruleset in the server namespace, fastknockfwd and fastknockd as subprocesses, the real
client for the knocks, TCP listeners on every probed port. Each test first shows that
nothing is open without a knock (the control), then what the knock opens and what it
does not.
"""

from __future__ import annotations

import signal
import sys

import pytest

from tests import netns
from tests.e2e_peers import CHALLENGE, COMEIN, KNOCK, RESPONSE, REVOKE, Listeners, signed, unpack
from tests.e2e_support import (
    KEY1,
    USER1,
    Daemon,
    Res,
    Stack,
    jump_res,
    port_res,
    server_config,
    wait_for,
)

pytestmark = pytest.mark.e2e

PREFIX = port_res(0x301, 2301, " / ipv4-prefix: 24 / ipv6-prefix: 64")
PLAIN = port_res(0x302, 2302)
RANGE = port_res(0x303, 60000, "-60002")  # "port: 60000-60002"
JUMP = jump_res(0x304, "MYCHAIN-PFX", 2304, " / ipv4-prefix: 24 / ipv6-prefix: 64")
FAR4, FAR6 = "10.77.1.2", "fd77:0:0:1::2"  # the other /24 and /64


def _stack(name: str, resources: tuple[Res, ...] = (PREFIX, PLAIN, RANGE)) -> Stack:
    netns.require()
    stack = Stack(name, resources)
    try:
        p = stack.pair
        netns.run(p.client, ["ip", "addr", "add", f"{FAR4}/24", "dev", "fk1"], check=True)
        netns.run(p.client, ["ip", "addr", "add", f"{FAR6}/64", "dev", "fk1", "nodad"], check=True)
        netns.run(p.server, ["ip", "route", "add", "10.77.1.0/24", "dev", "fk0"], check=True)
        netns.run(p.server, ["ip", "route", "add", "fd77:0:0:1::/64", "dev", "fk0"], check=True)
    except BaseException:
        stack.close()
        raise
    return stack


def _exchange(stack: Stack, src: str, op: int, rid: int, v6: bool = False) -> bool:
    """One KNOCK or REVOKE from ``src`` (not the client's default source) to COMEIN."""
    peer = stack.udp(src, v6)
    try:
        peer.send(signed(KEY1, op, USER1, rid))
        reply = peer.recv(5.0)
        if reply is None or unpack(reply).op != CHALLENGE:
            return False
        peer.send(signed(KEY1, RESPONSE, USER1, rid, unpack(reply).auth))
        reply = peer.recv(5.0)
        return reply is not None and unpack(reply).op == COMEIN
    finally:
        peer.close()


def _fwd_list(stack: Stack) -> str:
    argv = [sys.executable, "-m", "fastknock.fwd", "-c", str(stack.server_conf), "--list"]
    proc = netns.run(stack.pair.server, argv, env=None, cwd=str(stack.work))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_prefix_open_v4_v6_and_exact_revoke() -> None:
    with _stack("pfx") as stack:
        srv4, me4, peer4 = stack.addrs(v6=False)
        srv6, me6, peer6 = stack.addrs(v6=True)
        probes = [(me4, srv4), (peer4, srv4), (FAR4, srv4), (me6, srv6), (peer6, srv6),
                  (FAR6, srv6)]  # fmt: skip
        # The control: no knock, nothing open, from any of the addresses.
        assert not any(stack.connects(src, dst, PREFIX.probe) for src, dst in probes)
        assert stack.knock("knock", srv4, str(PREFIX.probe)).code == 0
        assert stack.knock("knock", srv4, str(PLAIN.probe)).code == 0
        # The knocker's /24 is open; the other /24 is not, nor any IPv6 address.
        assert stack.connects(me4, srv4, PREFIX.probe)
        assert stack.connects(peer4, srv4, PREFIX.probe)
        assert not stack.connects(FAR4, srv4, PREFIX.probe)
        assert not stack.connects(me6, srv6, PREFIX.probe)
        # The exact resource opened the knocker alone (its neighbour is the control).
        assert stack.connects(me4, srv4, PLAIN.probe)
        assert not stack.connects(peer4, srv4, PLAIN.probe)
        listing = _fwd_list(stack)
        assert "10.77.0.0/24" in listing and f"tcp/{PREFIX.probe}" in listing, listing
        # IPv6: the knocker's /64.
        assert stack.knock("knock", srv6, str(PREFIX.probe), "-6").code == 0
        assert stack.connects(peer6, srv6, PREFIX.probe)
        assert not stack.connects(FAR6, srv6, PREFIX.probe)
        assert "fd77::/64" in _fwd_list(stack)
        # The other /24 and /64 do reach the server (routing is not why they failed):
        # their own knock of the exact resource opens it for them.
        assert _exchange(stack, FAR4, KNOCK, PLAIN.id)
        assert _exchange(stack, FAR6, KNOCK, PLAIN.id, v6=True)
        assert stack.connects(FAR4, srv4, PLAIN.probe) and stack.connects(FAR6, srv6, PLAIN.probe)
        assert not stack.connects(FAR4, srv4, PREFIX.probe)
        # Revoke the IPv4 prefix lease: exactly it goes; the exact lease and the /64 stay.
        assert stack.knock("revoke", srv4, str(PREFIX.probe)).code == 0
        assert not stack.connects(me4, srv4, PREFIX.probe)
        assert not stack.connects(peer4, srv4, PREFIX.probe)
        assert stack.connects(me4, srv4, PLAIN.probe)
        assert stack.connects(peer6, srv6, PREFIX.probe)
        assert "10.77.0.0/24" not in _fwd_list(stack)


def test_two_holders_of_one_prefix() -> None:
    """10.77.0.2 and 10.77.0.3 both hold 10.77.0.0/24: one revokes, the other still
    connects; when the second revokes too, the prefix closes."""
    with _stack("hold") as stack:
        srv4, me4, peer4 = stack.addrs(v6=False)
        assert not stack.connects(peer4, srv4, PREFIX.probe)  # the control
        assert _exchange(stack, me4, KNOCK, PREFIX.id)
        assert _exchange(stack, peer4, KNOCK, PREFIX.id)
        assert _exchange(stack, me4, REVOKE, PREFIX.id)
        assert stack.connects(peer4, srv4, PREFIX.probe)
        assert stack.connects(me4, srv4, PREFIX.probe)  # the /24 is still open
        assert "1 lease(s)" in _fwd_list(stack)
        assert _exchange(stack, peer4, REVOKE, PREFIX.id)
        assert not stack.connects(peer4, srv4, PREFIX.probe)
        assert not stack.connects(me4, srv4, PREFIX.probe)


def test_port_range_opens_its_ends_and_nothing_beyond() -> None:
    with _stack("rng") as stack:
        srv4, me4, _peer4 = stack.addrs(v6=False)
        extra = Listeners(stack.pair.server, [59999, 60001, 60002, 60003])
        try:
            ports = (59999, 60000, 60001, 60002, 60003)
            assert not any(stack.connects(me4, srv4, port) for port in ports)  # the control
            # The client finds the resource by any port of its range.
            assert stack.knock("knock", srv4, "60001").code == 0
            opened = {port: stack.connects(me4, srv4, port) for port in ports}
            assert opened == {59999: False, 60000: True, 60001: True, 60002: True, 60003: False}
            listing = _fwd_list(stack)
            assert f"{me4}" in listing and "tcp/60000-60002" in listing, listing
            assert "fastknock_tcp4_ranges" in stack.nft("list", "ruleset")
        finally:
            extra.close()


def _reload(daemon: Daemon | None) -> None:
    assert daemon is not None
    before = daemon.text().count("reloaded")
    daemon.send_signal(signal.SIGHUP)
    wait_for("reload", lambda: daemon.text().count("reloaded") > before)


def test_reload_to_a_narrower_prefix_replaces_the_old_element() -> None:
    """A /16 lease with two holders, then the admin narrows the resource to /24 and
    reloads: the next knock replaces the /16 element (an interval set cannot hold both;
    the kernel would refuse the overlapping /24, and the current shape wins), so the other
    /24 of the old /16 is closed, the knocker's /24 stays open; a revoke then leaves
    nothing."""
    wide = port_res(0x301, 2301, " / ipv4-prefix: 16")
    with _stack("rel", (wide,)) as stack:
        srv4, me4, peer4 = stack.addrs(v6=False)
        assert not stack.connects(FAR4, srv4, wide.probe)  # the control
        assert stack.knock("knock", srv4, str(wide.probe)).code == 0
        assert _exchange(stack, peer4, KNOCK, wide.id)  # a second holder of the /16
        assert stack.connects(FAR4, srv4, wide.probe)  # 10.77.1.2 is in 10.77.0.0/16
        narrow = port_res(0x301, 2301, " / ipv4-prefix: 24")
        stack.server_conf.write_text(server_config([narrow], "basic-auth", 1.0))
        _reload(stack.fwd)  # first: requests carry the new config's checksum
        _reload(stack.server)
        assert stack.connects(FAR4, srv4, wide.probe)  # the old lease lives on until...
        assert stack.knock("knock", srv4, str(wide.probe)).code == 0  # ...a knock replaces it
        assert not stack.connects(FAR4, srv4, wide.probe)
        assert stack.connects(peer4, srv4, wide.probe)
        assert stack.fwd is not None and "replacing PortLease" in stack.fwd.text()
        listing = _fwd_list(stack)
        assert "10.77.0.0/24" in listing and "10.77.0.0/16" not in listing, listing
        assert stack.knock("revoke", srv4, str(wide.probe)).code == 0
        assert not stack.connects(me4, srv4, wide.probe)
        assert "0 lease(s)" in _fwd_list(stack)


def test_jump_with_saddr_match_opens_the_prefix() -> None:
    """``jump / input: C / input-match: saddr / ipv4-prefix: 24``: the rule matches the
    knocker's /24 (``ip saddr 10.77.0.0/24 jump C``), not the other /24."""
    with _stack("jmp", (JUMP, PLAIN)) as stack:
        srv4, me4, peer4 = stack.addrs(v6=False)
        assert not stack.connects(peer4, srv4, JUMP.probe)  # the control
        assert _exchange(stack, me4, KNOCK, JUMP.id)
        assert "ip saddr 10.77.0.0/24 jump MYCHAIN-PFX" in stack.nft(
            "list", "chain", "inet", "filter", "LETMEIN-INPUT"
        )
        assert stack.connects(peer4, srv4, JUMP.probe)
        assert not stack.connects(FAR4, srv4, JUMP.probe)
        assert _exchange(stack, FAR4, KNOCK, PLAIN.id)  # FAR4 is reachable (the control)
        assert stack.connects(FAR4, srv4, PLAIN.probe)
        assert _exchange(stack, me4, REVOKE, JUMP.id)
        assert not stack.connects(peer4, srv4, JUMP.probe)
