"""The pre-filter on the real kernel: traffic from a client namespace over a veth pair.

``Firewall.setup`` (what fastknockfwd runs at start) installs letmein's example ruleset's
control-port rules plus the pre-filter in a server namespace; a plain UDP socket on the
control port counts what arrives, per source address. Asserted: wrong sizes never reach
the socket, a flooding source gets its burst plus its rate and no more, another source
(or another IPv6 prefix) is not affected, a same-/64 neighbour shares the bucket, and
a flow that conntrack already calls established (the server answered it: a replayed valid
KNOCK draws a CHALLENGE) is limited all the same, and ``prefilter = off`` lets everything
through. Bounds use the measured sending time, so they
are correctness bounds (burst + rate x elapsed), not performance thresholds.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from fastknock.conf.config import NftablesConfig
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables
from tests import netns

pytestmark = pytest.mark.e2e

PORT = 5800
RATE, BURST = 1, 40
# No spare allowance here (the per-source bounds are exact); test_prefilter_fill_e2e.py
# covers the spare and the proven sources.
CFG = NftablesConfig(
    chain_input="LETMEIN-INPUT", prefilter_rate=RATE, prefilter_burst=BURST, prefilter_spare=0
)
MSG = b"K" * 56
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; root may exceed net.core.rmem_max


@pytest.fixture
def pair() -> Iterator[netns.Pair]:
    netns.require()
    with netns.veth_pair() as p:
        netns.load_ruleset(p.server)
        yield p


def setup(pair: netns.Pair, cfg: NftablesConfig) -> None:
    with netns.entered(pair.server):
        runner = LibNftables()
        try:
            firewall(cfg, runner).setup()
        finally:
            runner.close()


def firewall(cfg: NftablesConfig, runner: LibNftables) -> Firewall:
    return Firewall(cfg, runner, control_port=PORT, control_tcp=False, control_udp=True)


class Receiver:
    """A dual-stack UDP socket on the control port in the server namespace."""

    def __init__(self, ns: str) -> None:
        self.sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind(("::", PORT))

    def collect(self, settle: float = 0.3) -> tuple[Counter[str], Counter[int]]:
        """(datagrams per source address, datagrams per size) until quiet for ``settle``."""
        by_src: Counter[str] = Counter()
        by_size: Counter[int] = Counter()
        self.sock.settimeout(settle)
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                return by_src, by_size
            by_src[addr[0].removeprefix("::ffff:")] += 1
            by_size[len(data)] += 1

    def close(self) -> None:
        self.sock.close()


def send(ns: str, src: str, dst: str, datagrams: list[bytes]) -> float:
    """Send from ``src`` (one socket, one source port); returns the seconds it took."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns.socket_in(ns, family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        start = time.monotonic()
        for d in datagrams:
            s.sendto(d, (dst, PORT))
        return time.monotonic() - start


def test_wrong_sizes_never_reach_the_socket_and_a_flood_is_limited(pair: netns.Pair) -> None:
    setup(pair, CFG)
    rx = Receiver(pair.server)
    try:
        flooder, other = pair.client_v4
        sizes = [b"", b"k" * 55, b"k" * 57, b"k" * 1000, b"k" * 1400]
        send(pair.client, other, pair.server_v4, sizes * 3 + [MSG] * 10)
        by_src, by_size = rx.collect()
        assert by_size == Counter({56: 10}) and by_src == Counter({other: 10})

        elapsed = send(pair.client, flooder, pair.server_v4, [MSG] * 3000)
        send(pair.client, other, pair.server_v4, [MSG] * 20)
        by_src, _ = rx.collect()
        assert BURST <= by_src[flooder] <= BURST + RATE * (elapsed + 2)
        assert by_src[other] == 20  # the flood did not use up anyone else's budget
    finally:
        rx.close()


def test_an_established_flow_is_limited_too(pair: netns.Pair) -> None:
    """The pre-filter runs before conntrack: the receiver's reply makes the flow
    'established' for letmein's ruleset (which accepts those early), and it is still
    limited."""
    setup(pair, CFG)
    rx = Receiver(pair.server)
    flooder = pair.client_v4[0]
    try:
        with netns.socket_in(pair.client, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((flooder, 0))
            s.sendto(MSG, (pair.server_v4, PORT))
            rx.sock.settimeout(2)
            _, addr = rx.sock.recvfrom(100)
            rx.sock.sendto(b"challenge", addr)  # the reply: conntrack now has both ways
            s.settimeout(2)
            assert s.recv(100) == b"challenge"
            start = time.monotonic()
            for _ in range(2000):
                s.sendto(MSG, (pair.server_v4, PORT))
            elapsed = time.monotonic() - start
        by_src, _ = rx.collect()
        assert by_src[flooder] <= BURST + RATE * (elapsed + 2)
    finally:
        rx.close()


def test_ipv6_sources_are_limited_per_prefix(pair: netns.Pair) -> None:
    flooder, neighbour = pair.client_v6  # fd77::2 and fd77::3: the same /64
    setup(pair, CFG)
    rx = Receiver(pair.server)
    try:
        elapsed = send(pair.client, flooder, pair.server_v6, [MSG] * 1000)
        elapsed += send(pair.client, neighbour, pair.server_v6, [MSG] * 20)
        by_src, _ = rx.collect()
        # One bucket for the /64: both together get the burst (plus the rate) once.
        assert BURST <= by_src[flooder] + by_src[neighbour] <= BURST + RATE * (elapsed + 2)
        assert by_src[neighbour] <= RATE * (elapsed + 2)
    finally:
        rx.close()
    # Per address (/128): the neighbour has its own bucket.
    setup(pair, dataclasses.replace(CFG, prefilter_ipv6_prefix=128))  # fresh buckets
    rx = Receiver(pair.server)
    try:
        send(pair.client, flooder, pair.server_v6, [MSG] * 1000)
        send(pair.client, neighbour, pair.server_v6, [MSG] * 20)
        by_src, _ = rx.collect()
        assert by_src[neighbour] == 20
    finally:
        rx.close()


def test_prefilter_off_lets_everything_through(pair: netns.Pair) -> None:
    setup(pair, dataclasses.replace(CFG, prefilter=False))
    rx = Receiver(pair.server)
    try:
        flooder = pair.client_v4[0]
        send(pair.client, flooder, pair.server_v4, [MSG] * 300 + [b"k" * 57] * 5)
        by_src, by_size = rx.collect()
        assert by_src[flooder] == 305 and by_size[57] == 5
    finally:
        rx.close()
