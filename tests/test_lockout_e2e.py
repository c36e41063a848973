"""No lock-out without a key, end to end on the real kernel (issues 10 and 11).

Each attack runs against the real daemons in namespaces the test creates (``Stack``), with
a no-attack control in the same test. The attacker sends only from inside the client
namespace, to the server namespace, bounded in time; spoofed sources (10.99.0.0/16) are
routed back into the client namespace, which drops the replies.

Legitimate knocks here are single-shot (one KNOCK, one RESPONSE, no retransmission) through
raw sockets and the independent codec of ``e2e_support``, so a lost datagram is a failure.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from fastknock.knockd.replaycap import PEERS
from tests import netns, spoof
from tests.e2e_peers import KNOCK, signed
from tests.e2e_support import KEY1, USER1, Stack, port_res, wait_for

pytestmark = pytest.mark.e2e

RES = port_res(0x301, 2601)
CONTROL_TIMEOUT = 5.0  # the defaults: -n 64 -N 8, control-timeout 5, pre-filter on
SPOOF_NET = "10.99"
CHALLENGES = "fastknockd_challenges_total"
CAPPED = 'fastknockd_rejected_total{reason="knock-replay-capped"}'


class Background:
    """A daemon thread running ``self.run_until(stop)``, started on ``with`` entry and
    stopped (event set, joined) on exit; ``seconds`` is how long it ran."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run_until, args=(self._stop,), daemon=True)

    def run_until(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.seconds = time.monotonic() - self.started


class Replayer(Background):
    """Sends one captured datagram from ``sources`` spoofed addresses (round robin, a new
    source port per round) as fast as one thread can, until stopped or ``limit`` s."""

    def __init__(self, stack: Stack, payload: bytes, sources: int, limit: float = 60.0) -> None:
        super().__init__()
        self.stack = stack
        self.dst = stack.addrs(False)[0]
        self.packets = [
            spoof.packet(f"{SPOOF_NET}.{i // 250}.{i % 250 + 1}", 0, self.dst, 5800, payload)
            for i in range(sources)
        ]
        self.sent = 0
        self.limit = limit

    def run_until(self, stop: threading.Event) -> None:
        with netns.entered(self.stack.ns):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw as s:
            end = time.monotonic() + self.limit
            port = 20000
            while not stop.is_set() and time.monotonic() < end:
                port = port + 1 if port < 60000 else 20000
                sport = struct.pack("!H", port)
                for pkt in self.packets:
                    try:
                        s.sendto(pkt[:20] + sport + pkt[22:], (self.dst, 0))
                    except OSError:  # a full queue: keep going
                        continue
                    self.sent += 1


def _spoofed_sources_route_back(stack: Stack) -> None:
    """Replies to the spoofed sources go back into the client namespace (and die there)."""
    netns.run(
        stack.pair.server,
        ["ip", "route", "add", f"{SPOOF_NET}.0.0/16", "via", stack.pair.client_v4[0]],
        check=True,
    )


_ports = iter(range(30000, 40000))


def legit_knocks(stack: Stack, n: int, src: str) -> int:
    """``n`` single-shot knocks (no retransmission) from ``src``, each from a source port of
    its own (``Stack.knock_once``): how many got COMEIN."""
    return sum(stack.knock_once(src, RES.id, sport=next(_ports)) is not None for _ in range(n))


def test_a_knock_replayed_from_1000_addresses_locks_nobody_out() -> None:
    """Issue 10: one captured KNOCK, replayed from 1,000 spoofed addresses at the
    generator's rate, never answering the CHALLENGE. Control: 50 knocks with no attack.
    Then 50 knocks during the replay, and 50 more after it has run across an epoch
    boundary (6 s, control timeout 5 s): all must succeed, without retransmission. The
    answer cap (``knockd.replaycap``) answers the replay for ``PEERS`` peers per epoch and
    drops the rest before any MAC: the CHALLENGEs sent stay bounded."""
    netns.require()
    with Stack("replay1k", [RES], timeout=CONTROL_TIMEOUT, verbose=False, metrics=True) as stack:
        _spoofed_sources_route_back(stack)
        other = stack.addrs(False)[2]
        assert legit_knocks(stack, 50, other) == 50  # the no-attack control
        captured = signed(KEY1, KNOCK, USER1, RES.id)
        wait_for("the control's metrics", lambda: stack.metrics().get(CHALLENGES) == 50)
        assert stack.metrics()[CAPPED] == 0
        with Replayer(stack, captured, 1000) as attack:
            time.sleep(1.0)  # the flood is on before the first legit knock
            during = legit_knocks(stack, 50, other)
            time.sleep(max(0.0, 6.0 - (time.monotonic() - attack.started)))
            during += legit_knocks(stack, 50, other)
        rate = attack.sent / attack.seconds
        print(f"replay: {attack.sent} datagrams in {attack.seconds:.1f} s ({rate:.0f}/s)")
        assert attack.sent > 20_000, f"the generator sent only {attack.sent} datagrams"
        assert during == 100, f"{during}/100 legit knocks under a replay at {rate:.0f}/s"
        # Stateless and capped: the replay held no slot, and only PEERS copies per epoch
        # got a CHALLENGE (at most two epochs more than it lasted: it may straddle them).
        wait_for(
            "the metrics of all 150 knocks",
            lambda: stack.metrics().get("fastknockd_knocks_total") == 150,
        )
        metrics = stack.metrics()
        assert metrics["fastknockd_sessions_active"] == 0
        epochs = int(attack.seconds // CONTROL_TIMEOUT) + 2
        assert 150 <= metrics[CHALLENGES] <= 150 + PEERS * epochs, metrics[CHALLENGES]
        assert metrics[CAPPED] >= attack.sent // 2, (metrics[CAPPED], attack.sent)
        assert stack.server is not None and stack.server.alive()


class IdleHolders(Background):
    """``per`` idle TCP connections to the control port from each of ``addrs``, each
    reconnected (at most every 20 ms) as soon as the server closes it. Bounded: stops
    when told or after ``limit`` s."""

    def __init__(self, stack: Stack, addrs: list[str], per: int, limit: float = 60.0) -> None:
        super().__init__()
        self.stack = stack
        self.slots = [a for a in addrs for _ in range(per)]
        self.dst = stack.addrs(False)[0]
        self.connects = 0
        self.limit = limit

    def _connect(self, src: str) -> socket.socket | None:
        with netns.entered(self.stack.ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((src, 0))
            s.connect_ex((self.dst, 5800))
        except OSError:
            s.close()
            return None
        self.connects += 1
        return s

    def run_until(self, stop: threading.Event) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for src in self.slots:
            s = self._connect(src)
            if s is not None:
                sel.register(s, selectors.EVENT_READ, src)
        end = time.monotonic() + self.limit
        while not stop.is_set() and time.monotonic() < end:
            for key, _ in sel.select(0.02):
                s, src = key.fileobj, key.data
                try:
                    closed = s.recv(100) == b""  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                if closed:  # the server closed it: be back at once (rate-bounded by select)
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                    t = self._connect(src)
                    if t is not None:
                        sel.register(t, selectors.EVENT_READ, src)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def test_idle_tcp_connections_from_16_addresses_lock_nobody_out() -> None:
    """Issue 11: 16 addresses x 8 idle TCP connections (128), reconnecting when closed,
    at the defaults. Control first, then during the attack: the real client knocks over
    TCP and over UDP from another address, every time."""
    netns.require()
    with Stack("idle128", [RES], timeout=CONTROL_TIMEOUT, verbose=False, metrics=True) as stack:
        attackers = [f"10.77.0.{10 + i}" for i in range(16)]
        for a in attackers:
            netns.run(stack.ns, ["ip", "addr", "add", f"{a}/24", "dev", "fk1"], check=True)
        server, me, _ = stack.addrs(False)
        rid = f"{RES.id:08X}"

        def knocks() -> list[int]:
            return [
                stack.knock("knock", server, "-r", rid, flag, "-4").code
                for flag in ("-T", "-U")
                for _ in range(5)
            ]

        assert knocks() == [0] * 10  # the no-attack control
        with IdleHolders(stack, attackers, 8) as idle:
            time.sleep(2.0)  # the holders are in place and cycling
            during = knocks()
        assert idle.connects >= 128
        assert during == [0] * 10, during
        wait_for(
            "the pre-auth refusals in the metrics",
            lambda: stack.metrics().get('fastknockd_rejected_total{reason="tcp-budget"}', 0) > 0,
        )
