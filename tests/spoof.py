"""Spoofed UDP datagrams for the pre-filter tests: any source address and port, raw sockets.

- ``Spoofer(ns, family)``: a raw socket (``IPPROTO_RAW``: the caller writes the IP header)
  living in the namespace ``ns``; ``send(src, sport, dst, dport, payload)`` sends one
  datagram with that source, ``send_many`` a list of them.
- ``Flood``: a thread that sends junk from one (spoofed) source address with random source
  ports at a paced rate until stopped; ``sent`` counts what it sent.
- ``static_neighbours(pair)``: the server's neighbour entries, fixed in the client namespace.
- ``sources4(n)`` / ``sources6_64(n)``: n distinct addresses outside the test's own subnets
  (100.64.0.0/10; one per /64 in fd00::/8, spread over distinct /48s).

Only ever used inside namespaces the tests create (``tests.netns``); the server namespace
needs no route back to these sources (it never answers junk).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable

from tests import netns


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF


def packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 header plus a UDP datagram (IPv6 with its mandatory checksum)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, s.packed, d.packed)
        return ip + struct.pack("!HHHH", sport, dport, length, 0) + payload  # no UDP checksum
    pseudo = s.packed + d.packed + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = _checksum(pseudo + udp)
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, s.packed, d.packed)
    return ip + udp


class Spoofer:
    def __init__(self, ns: str, family: socket.AddressFamily) -> None:
        self.family = family
        with netns.entered(ns):
            self.sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def send(self, src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
        pkt = packet(src, sport, dst, dport, payload)
        while True:
            try:
                self.sock.sendto(pkt, (dst, 0))
                return
            except BlockingIOError:  # the send buffer is full: wait for the veth
                time.sleep(0.001)
            except OSError as exc:
                if exc.errno != 105:  # ENOBUFS: the same, wait
                    raise
                time.sleep(0.001)

    def send_many(
        self, srcs: Iterable[str], dst: str, dport: int, payload: bytes, sport: int = 40000
    ) -> int:
        n = 0
        for src in srcs:
            self.send(src, sport, dst, dport, payload)
            n += 1
        return n

    def close(self) -> None:
        self.sock.close()


def static_neighbours(pair: netns.Pair) -> None:
    """Permanent neighbour entries for the server in the client namespace: the kernel
    would otherwise solicit them with a spoofed source, whose answer never comes back."""
    link = json.loads(netns.run(pair.server, ["ip", "-j", "link", "show", "fk0"]).stdout)
    mac = link[0]["address"]
    for addr in (pair.server_v4, pair.server_v6):
        netns.run(pair.client, ["ip", "neigh", "replace", addr, "lladdr", mac, "dev", "fk1",
                                "nud", "permanent"], check=True)  # fmt: skip


def sources4(n: int) -> list[str]:
    base = int(ipaddress.ip_address("100.64.0.0"))
    return [str(ipaddress.ip_address(base + 1 + i)) for i in range(n)]


def sources6_64(n: int) -> list[str]:
    """One address in each of n distinct /64s, each in a distinct /48 (fd00:XXXX:XX00::/48)."""
    base = int(ipaddress.ip_address("fd00::"))
    return [str(ipaddress.ip_address(base + ((i + 1) << 88) + 1)) for i in range(n)]


class Flood(threading.Thread):
    """Junk (56 random bytes) from ``src`` with random source ports at ``rate``/s."""

    def __init__(self, ns: str, src: str, dst: str, dport: int, rate: int) -> None:
        super().__init__(daemon=True)
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        self.spoofer = Spoofer(ns, family)
        self.src, self.dst, self.dport, self.rate = src, dst, dport, rate
        self.sent = 0
        self.elapsed = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        batch = max(self.rate // 100, 1)  # paced in 10 ms steps
        try:
            while not self._halt.is_set():
                for _ in range(batch):
                    sport = 1024 + int.from_bytes(os.urandom(2)) % 64000
                    self.spoofer.send(self.src, sport, self.dst, self.dport, os.urandom(56))
                self.sent += batch
                due = start + self.sent / self.rate
                self._halt.wait(max(due - time.monotonic(), 0))
        finally:
            self.elapsed = time.monotonic() - start
            self.spoofer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()
