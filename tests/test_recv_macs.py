"""The C reader's MAC verdicts computed ahead, four at a time (``Reader.macs_from``,
``KeyRing.verify_knocks``): the batch is still decided exactly as one by one.

Differential over real loopback sockets: the same plan of full 64-datagram batches through
the Python reader and the C reader with the 4-way AVX2 MACs on and off gives the same
hand-ups, the same replies to every client and the same counters. The plan mixes what can
make a verdict computed ahead unneeded: a peer that gets a session in the middle of a batch
(its later datagrams go to Python without a MAC), a captured KNOCK replayed from many peers
(the cap fills in the middle of a batch), a key-ring swap between batches, next to forged
KNOCKs of three users, valid granted and ungranted ones, REVOKEs, RESPONSEs (their four
candidate tokens and MAC checks are the four ways of two ``hmac52_x4``), forged ones, and
junk.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator

import pytest

from fastknock.message import Operation
from tests.conftest import load_impl
from tests.test_recv import (
    NO_EXTENSIONS,
    OTHER_USER,
    RES,
    USER,
    counts,
    dest,
    drain_until,
    knock,
    make,
)
from tests.test_recv_challenges import response_for

pytestmark = pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")

THIRD_USER = 0x00000003
KEYS = {USER: None, OTHER_USER: os.urandom(32), THIRD_USER: os.urandom(32)}
BATCH = 64
SECRET = b"\x11" * 32
EPOCH = 7
CLIENTS = 24
SESSIONS = 4  # the clients whose ungranted KNOCKs open a session


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(CLIENTS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def plan(rng: random.Random, keys: dict[int, bytes], peers: list) -> list[tuple[int, bytes]]:
    captured = knock()
    secret = load_impl("py").mac.HmacKey(SECRET)
    steps = []
    for _ in range(BATCH * 14):
        who = rng.randrange(CLIENTS)
        r = rng.random()
        user = rng.choice(sorted(keys))
        if r < 0.4:  # forged: a valid KNOCK with one AUTH byte changed
            data = knock(user, keys[user])
            data = data[:40] + bytes([data[40] ^ 1]) + data[41:]
        elif r < 0.55:
            data = knock()  # granted: answered in C
        elif r < 0.62:
            data = knock(OTHER_USER, keys[OTHER_USER])  # no grant: Python, which opens a session
            who = rng.randrange(SESSIONS)
        elif r < 0.67:
            data = knock(op=Operation.REVOKE)
        elif r < 0.8:
            data = captured
        elif r < 0.85:  # a RESPONSE to the CHALLENGE this peer got (if it got one yet)
            who = rng.randrange(SESSIONS)
            data = response_for(load_impl("py"), secret, EPOCH, peers[who])
        elif r < 0.9:  # a forged one
            data = response_for(load_impl("py"), secret, EPOCH, peers[who])
            data = data[:30] + bytes([data[30] ^ 4]) + data[31:]
        else:
            data = rng.randbytes(rng.choice([56, 40]))
        steps.append((who, data))
    return steps


def run(name: str, vector: bool, steps: list, keys: dict[int, bytes], server, clients) -> tuple:
    ns = load_impl(name.split("-")[0])
    if name.startswith("c"):
        from fastknock import _hmac

        _hmac.vector_macs(vector)
    reader, rec, _ = make(ns, server, open_sessions=True, cap_seed=bytes(16))
    reader.configure(ns.mac.KeyRing(keys), False)  # type: ignore[attr-defined]
    cur = ns.mac.HmacKey(SECRET)
    reader.set_secrets(cur, EPOCH, None)  # type: ignore[attr-defined]
    reader.set_grants({USER << 32 | RES})  # type: ignore[attr-defined]
    totals = dict.fromkeys(ns.COUNTERS, 0)
    for b in range(0, len(steps), BATCH):
        if b == BATCH * 7:  # a reload between two batches: the same keys, a new ring
            reader.configure(ns.mac.KeyRing(keys), False)  # type: ignore[attr-defined]
        for who, data in steps[b : b + BATCH]:
            clients[who].sendto(data, dest(server))
        assert drain_until(reader, server, BATCH) == BATCH
        for field, value in counts(reader).items():
            totals[field] += value
    replies = []
    for i, s in enumerate(clients):
        while True:
            try:
                replies.append((i, s.recv(100)))
            except BlockingIOError:
                break
    totals.pop("batches")
    return [d for d, _ in rec.got], replies, totals


def test_batched_macs_decide_as_one_by_one(server: socket.socket, clients: list) -> None:
    from fastknock import _hmac
    from tests.test_recv import KEY

    keys = {**KEYS, USER: KEY}
    steps = plan(random.Random(77), keys, [c.getsockname() for c in clients])
    before = _hmac.vector_macs()
    try:
        results = {
            name: run(name, name == "c-vector", steps, keys, server, clients)
            for name in ("py", "c-vector", "c-scalar")
        }
    finally:
        _hmac.vector_macs(before)
    assert results["c-vector"] == results["py"]
    assert results["c-scalar"] == results["py"]
    got = results["py"][2]
    # The plan reached every path it is about.
    assert got["mac"] > 200 and got["challenged"] > 50 and got["capped"] > 30
    assert got["live_hits"] > 20 and got["handed_up"] > got["live_hits"]
    assert got["response"] > 20
