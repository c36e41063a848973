#!/usr/bin/env python3
"""Fuzz target "recv": fastknockd's batched UDP reader on real loopback sockets, C vs Python.

Invariant: for any sequence of datagrams sent over 127.0.0.1 (or to a dual-stack socket),
with any reader settings and any sessions the endpoint opens and ends as datagrams are
handed up, the C reader (``fastknock.knockd._recv`` + the C key ring) and the pure-Python
reference (``_recv_py`` + the Python key ring) return the same counts from every
``drain()``, the same counters from every ``take()``, hand up the same datagrams with the
same addresses in the same order, send the same replies (the CHALLENGEs a reader answers a
granted KNOCK with itself) to the same clients in the same order, and leave the endpoint
with the same sessions; neither raises. The reference decides one datagram at a time, the
C reader a batch of 64 at once: this is the check that batching changes nothing a peer or
an operator can see.

Each execution gets fresh readers and endpoints over sockets reused between executions (a
socket per family and implementation, sixteen clients), all bound to loopback. Every datagram
goes to both servers from the same client, so both see the same sources in the same order.

Input layout (a byte stream; missing bytes read as zero):
  byte 0: bit 0 dual-stack server (else IPv4), bit 1 pass_rejects, bits 2-3 budget - 1,
          bit 4 a custom allowed_ops mask from the next byte (else FIRST_OPS), bit 5
          challenge secrets set (epoch: the next byte), bit 6 a previous secret too, bit 7
          (USER, RESOURCE) granted (so the readers answer its KNOCKs themselves)
  then up to 4 rounds, each: a byte r -- (r & 0x7F) + 1 datagrams; bit 7: every session
  times out first -- then per datagram a byte d -- client d & 3, kind (d >> 2) & 7, the
  endpoint's action when it is handed up d >> 5 -- and 2 salt bytes (kinds 0-5, 7) or a
  length and that many bytes (kind 6, raw). A KNOCK or REVOKE whose first salt byte s has
  bit 7 set is instead a byte-identical replay of the last KNOCK/REVOKE sent, from client
  4 + s % 12 (sixteen peers in all: enough to reach the KNOCK answer cap of
  ``knockd.replaycap``, by peers and by answers). After a round: drain until a drain
  reads nothing, then compare.
  Kinds: 0 KNOCK, 1 REVOKE, 2 RESPONSE signed over a token chosen by the first salt byte
  (& 3: this epoch's KNOCK token for the sender, the previous epoch's REVOKE token, zeros,
  another client's token), 3 KNOCK with a bad MAC, 4 unknown user, 5 bad magic, 6 raw
  bytes (0-100 of them), 7 signed CHALLENGE.
  Actions: 1 and 4 open a session for the peer, 2 ends the peer's session, 5 ends the
  oldest other session, 3 makes the handler raise (a bug in it: counted, never fatal);
  others do nothing.

Reader API: ``handler(data, key, addr)``, and the endpoint ``track()``s a peer key when a
session starts and ``untrack()``s it when one ends; ``set_secrets(current, epoch,
previous)`` and ``set_grants`` for the stateless challenges (``Endpoint`` below is the only
code that knows the API; each reader gets the secrets as its own implementation's
``HmacKey``). The handed-up keys are compared too: the C reader builds them from
the ``sockaddr``, the reference with ``knockd.peer.key_of``.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator

import atheris
import harness
from harness import Difference, same, short

with atheris.instrument_imports():
    from fastknock import _hmac, _hmac_py
    from fastknock._wire_py import pack
    from fastknock.knockd import _recv, _recv_py
    from fastknock.knockd._recv_py import COUNTERS
    from fastknock.knockd.challenges import token
    from fastknock.knockd.peer import key_of
    from fastknock.message import MAGIC, Operation
    from fastknock.protocol import FIRST_OPS

logging.getLogger("fastknockd").disabled = True  # the handler's deliberate failures
USER, OTHER_USER, RESOURCE = 0x00000001, 0x00000002, 0x00000022
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
SIGNER = _hmac_py.HmacKey(KEY)
IMPLS = ((_recv, _hmac), (_recv_py, _hmac_py))  # each reader with its own key ring
RINGS = tuple(mac.KeyRing({USER: KEY}) for _, mac in IMPLS)
CURRENT, PREVIOUS = b"c" * 32, b"p" * 32  # the challenge secrets (any 32 bytes)
SECRET_SIGNERS = (_hmac_py.HmacKey(CURRENT), _hmac_py.HmacKey(PREVIOUS))
MAX_ROUNDS = 4
BATCHES = COUNTERS.index("batches")


class Endpoint:
    """What the reader hands up to: records it and opens/ends sessions as told."""

    def __init__(self, impl: tuple, ring: object, sock: socket.socket, actions: dict,
                 secrets: tuple | None, grants: list[int], **settings: object) -> None:  # fmt: skip
        recv, mac = impl
        self.live: set[bytes] = set()
        self.got: list[tuple[bytes, bytes, tuple]] = []
        self.actions = actions
        self.reader = recv.Reader(sock, ring, self.handle, **settings)
        if secrets is not None:
            epoch, previous = secrets
            prev = mac.HmacKey(PREVIOUS) if previous else None
            self.reader.set_secrets(mac.HmacKey(CURRENT), epoch, prev)
        self.reader.set_grants(grants)

    def handle(self, data: bytes, key: bytes, addr: tuple) -> None:
        self.got.append((data, key, addr))
        action = self.actions.get(data, 0)
        if action in (1, 4) and key not in self.live:
            self.live.add(key)
            self.reader.track(key)  # type: ignore[attr-defined]
        elif action == 2:
            self.end(key)
        elif action == 5:
            others = sorted(self.live - {key})
            if others:
                self.end(others[0])
        elif action == 3:
            raise RuntimeError("handler bug (deliberate)")

    def end(self, key: bytes) -> None:
        self.live.discard(key)
        self.reader.untrack(key)  # type: ignore[attr-defined]

    def sessions(self) -> list[bytes]:
        return sorted(self.live)


class Net:
    """The sockets: per family a server for each implementation, and the clients."""

    def __init__(self) -> None:
        self.servers: dict[int, tuple[socket.socket, socket.socket]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            pair = tuple(self._server(family) for _ in IMPLS)
            self.servers[family] = pair  # type: ignore[assignment]
        self.clients = []
        for _ in range(16):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            c.setblocking(False)
            self.clients.append(c)
        # The peer key each reader sees for each client (IPv4 peers are always mapped).
        self.keys = [key_of(c.getsockname()) for c in self.clients]

    @staticmethod
    def _server(family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::ffff:127.0.0.1", 0))  # IPv6 sockaddrs, loopback only
        else:
            sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.setblocking(False)
        return sock

    @staticmethod
    def empty(sock: socket.socket) -> None:
        while True:
            try:
                sock.recv(128)
            except BlockingIOError:
                return

    def replies(self, ports: list[int]) -> list[list[tuple[int, bytes]]]:
        """What each server sent back, per server port: [(client index, datagram)]."""
        out: list[list[tuple[int, bytes]]] = [[] for _ in ports]
        for index, client in enumerate(self.clients):
            while True:
                try:
                    data, addr = client.recvfrom(128)
                except BlockingIOError:
                    break
                if addr[1] in ports:
                    out[ports.index(addr[1])].append((index, data))
        return out


NET = Net()


class Stream:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def more(self) -> bool:
        return self.pos < len(self.data)


@atheris.instrument_func
def datagram(kind: int, stream: Stream, seq: int, client: int, epoch: int) -> bytes:
    if kind == 6:
        return stream.take(stream.byte() % 101)
    salt = seq.to_bytes(2, "big") + stream.take(2) + bytes(4)  # unique per execution
    op = {1: Operation.REVOKE, 2: Operation.RESPONSE, 7: Operation.CHALLENGE}.get(
        kind, Operation.KNOCK
    )
    user = OTHER_USER if kind == 4 else USER
    challenge = bytes(32)
    if kind == 2:
        which = salt[2] & 3
        peer = NET.keys[(client + 1) % 4 if which == 3 else client]
        if which != 2:
            secret, e, knocked = (
                (SECRET_SIGNERS[0], epoch, Operation.KNOCK)
                if which != 1
                else (SECRET_SIGNERS[1], epoch - 1, Operation.REVOKE)
            )
            challenge = token(secret, e, knocked, user, RESOURCE, peer)  # type: ignore[arg-type]
    auth = SIGNER.sign(op, user, RESOURCE, salt, challenge)
    if kind == 3:
        auth = bytes([auth[0] ^ 1]) + auth[1:]
    data = pack(op, user, RESOURCE, salt, auth)
    if kind == 5:
        data = struct.pack(">I", MAGIC ^ 0x100) + data[4:]
    return data


def handed_up(c: list, py: list) -> None:
    """Raise ``Difference`` unless both readers handed up the same; the signature says
    which side handed up a datagram the other dropped, at the first divergence."""
    if c == py:
        return
    i = next(
        (i for i, (x, y) in enumerate(zip(c, py, strict=False)) if x != y), min(len(c), len(py))
    )
    extra = "C" if i < len(c) and c[i] not in py[i:] else "Python"
    other = "Python" if extra == "C" else "C"
    raise Difference(
        f"handed up: {extra} hands up a datagram {other} drops",
        f"at {i}: C {short(c[i : i + 3])} vs Python {short(py[i : i + 3])}",
    )


def drain_all(reader: object) -> list[tuple[int, tuple[int, ...]]]:
    """Every drain's count and the counters after it, until a drain reads nothing."""
    out = []
    while True:
        n = reader.drain()  # type: ignore[attr-defined]
        out.append((n, reader.take()))  # type: ignore[attr-defined]
        if n == 0 or len(out) > 64:
            return out


@atheris.instrument_func
def one(data: bytes) -> None:
    # The C reader's MACs four at a time (AVX2) or one after the other: chosen by the
    # input's length, so a saved input replays in the same mode.
    _hmac.vector_macs(len(data) % 2 == 0)
    stream = Stream(data)
    flags = stream.byte()
    family = socket.AF_INET6 if flags & 1 else socket.AF_INET
    settings = {
        "pass_rejects": bool(flags & 2),
        "budget": ((flags >> 2) & 3) + 1,
        "allowed_ops": stream.byte() & 0x3F if flags & 0x10 else FIRST_OPS,
    }
    epoch = stream.byte() if flags & 0x20 else 0
    secrets = (epoch, bool(flags & 0x40)) if flags & 0x20 else None
    grants = [USER << 32 | RESOURCE] if flags & 0x80 else []
    servers = NET.servers[family]
    for sock in (*servers, *NET.clients):
        NET.empty(sock)
    actions: dict[bytes, int] = {}
    ends = [
        Endpoint(impl, ring, sock, actions, secrets, grants, **settings)
        for impl, ring, sock in zip(IMPLS, RINGS, servers, strict=True)
    ]
    ports = [sock.getsockname()[1] for sock in servers]
    dests = [("127.0.0.1", port) for port in ports]
    seq = 0
    last_knock: bytes | None = None
    for _round in range(MAX_ROUNDS):
        if not stream.more():
            break
        header = stream.byte()
        if header & 0x80:  # the session timers fire
            for end in ends:
                for key in end.sessions():
                    end.end(key)
        for _ in range((header & 0x7F) + 1):
            d = stream.byte()
            seq += 1
            kind, index = (d >> 2) & 7, d & 3
            payload = datagram(kind, stream, seq, index, epoch)
            if kind in (0, 1):
                marker = payload[18]  # the first salt byte from the stream
                if marker & 0x80 and last_knock is not None:
                    payload, index = last_knock, 4 + marker % 12
                else:
                    last_knock = payload
            actions[payload] = d >> 5
            client = NET.clients[index]
            for dest in dests:
                client.sendto(payload, dest)
        c_drains, py_drains = (drain_all(end.reader) for end in ends)
        harness.add_units(sum(counts[BATCHES] for _, counts in c_drains))
        # What a peer can see first (which datagrams reach the protocol), then the rest.
        handed_up(ends[0].got, ends[1].got)
        c_replies, py_replies = NET.replies(ports)
        same("replies sent", c_replies, py_replies)
        same("sessions", ends[0].sessions(), ends[1].sessions())
        same("drain() counts", [n for n, _ in c_drains], [n for n, _ in py_drains])
        for (_, c_counts), (_, py_counts) in zip(c_drains, py_drains, strict=True):
            fields = [f for f, c, p in zip(COUNTERS, c_counts, py_counts, strict=True) if c != p]
            if fields:
                raise Difference(
                    f"take() counters {' '.join(fields)}", f"{c_drains} vs {py_drains}"
                )


def seeds() -> Iterator[bytes]:
    """A knock then its session's follow-up; the batch that ends one session and starts
    another (issue 12 finding 7); full batches (64, 65, 128 datagrams) with budget 1; every
    kind with every action under each setting; a custom allowed_ops mask."""

    def dgram(client: int, kind: int, action: int, salt: int = 0) -> bytes:
        extra = bytes([30]) + b"r" * 30 if kind == 6 else bytes([salt, 0])
        return bytes([client | kind << 2 | action << 5]) + extra

    follow = dgram(0, 2, 0)
    yield b"\0" + b"\x01" + dgram(0, 0, 1) + follow
    yield b"\0" + b"\x00" + dgram(1, 0, 1) + b"\x02" + dgram(1, 2, 2) + dgram(0, 0, 1) + follow
    yield b"\0" + b"\x00" + dgram(1, 0, 1) + b"\x81" + dgram(1, 2, 0) + follow  # timed out
    for family in (0, 1):
        for n in (64, 65, 128):
            body = b"".join(dgram(i & 3, i % 6, i % 5, i) for i in range(n))
            yield bytes([family, n - 1]) + body
    every = b"".join(dgram(k & 3, k, a) for k in range(8) for a in range(8))
    for flags in (0, 1, 2, 3, 0x0C):
        yield bytes([flags, 63]) + every
    yield b"\x10\x3f\x03" + dgram(0, 7, 1) + dgram(0, 0, 0) + dgram(1, 1, 0) + dgram(2, 3, 0)
    # Stateless challenges: granted KNOCKs answered by the reader, then RESPONSEs over each
    # kind of token (salt byte & 3), in one batch and in the next; both epochs; no grant.
    responses = b"".join(dgram(c, 2, 1, which) for c in range(4) for which in range(4))
    for flags in (0xA0, 0xE0, 0x60, 0xA1, 0xE3):
        for epoch in (0, 1, 255):
            knocks = dgram(0, 0, 0) + dgram(1, 1, 0) + dgram(2, 0, 1)
            yield bytes([flags, epoch, 2]) + knocks + bytes([15]) + responses
            yield bytes([flags, epoch, 18]) + knocks + responses
    # The KNOCK answer cap: one KNOCK replayed from twelve more peers, and 40 times by one
    # (capped by peers, then by answers), across two batches; then a fresh KNOCK.
    replays = b"".join(dgram(c & 3, 0, 0, 0x80 | c) for c in range(12))
    replays += b"".join(dgram(1, 0, 0, 0x80) for _ in range(40))
    for flags in (0xA0, 0xE1, 0x20, 0xA2):
        yield bytes([flags, 7, 53]) + dgram(0, 0, 0) + replays + dgram(2, 1, 0)
        yield bytes([flags, 7, 0]) + dgram(0, 0, 0) + bytes([51]) + replays


if __name__ == "__main__":
    harness.main("recv", one, seeds)
