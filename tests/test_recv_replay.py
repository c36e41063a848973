"""The KNOCK answer cap in the batched readers (``knockd.replaycap`` / ``_replay.pxd``): on
both readers (``impl``) over real loopback sockets, and C against Python.

A captured KNOCK is sent byte for byte from many client sockets (each its own source port,
so its own peer). The expected CHALLENGEs come from ``knockd.challenges``.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fastknock.knockd.challenges import challenge_bytes, token
from fastknock.knockd.peer import key_of
from fastknock.knockd.replaycap import ANSWERS, PEERS, WAYS, set_index
from fastknock.message import Operation
from tests.conftest import load_impl
from tests.test_recv import NO_EXTENSIONS, RES, USER, counts, dest, drain_until, knock, make

EPOCH = 41
SEED = bytes(range(16))


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(PEERS + 4):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def armed(ns: SimpleNamespace, server: socket.socket, grants: bool = True):
    reader, rec, _ = make(ns, server, cap_seed=SEED)
    cur = ns.mac.HmacKey(os.urandom(32))
    reader.set_secrets(cur, EPOCH, None)  # type: ignore[attr-defined]
    reader.set_grants({USER << 32 | RES} if grants else set())  # type: ignore[attr-defined]
    return reader, rec, cur


def send(server: socket.socket, reader: object, data: bytes, socks: list[socket.socket]) -> int:
    for s in socks:
        s.sendto(data, dest(server))
    return drain_until(reader, server, len(socks))


def answered(socks: list[socket.socket]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for s in socks:
        s.setblocking(False)
        try:
            out.append(s.recv(100))
        except BlockingIOError:
            out.append(None)
        s.settimeout(2)
    return out


def challenge_for(cur: object, s: socket.socket, op: Operation = Operation.KNOCK) -> bytes:
    tok = token(cur, EPOCH, op, USER, RES, key_of(s.getsockname()))  # type: ignore[arg-type]
    return challenge_bytes(tok, USER, RES)


def test_a_replayed_knock_is_answered_for_peers_peers_only(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    reader, rec, cur = armed(impl, server)
    captured = knock()
    assert send(server, reader, captured, clients) == len(clients)
    got = answered(clients)
    assert got[:PEERS] == [challenge_for(cur, s) for s in clients[:PEERS]]
    assert got[PEERS:] == [None] * (len(clients) - PEERS)
    c = counts(reader)
    assert c["challenged"] == PEERS and c["capped"] == len(clients) - PEERS
    assert c["dropped"] == c["capped"] and c["handed_up"] == 0 and rec.got == []
    # The first sender's retransmission (same bytes, same peer): answered, the same bytes.
    assert send(server, reader, captured, clients[:1]) == 1
    assert answered(clients[:1]) == [got[0]]
    # Another KNOCK from a capped peer: unaffected.
    assert send(server, reader, knock(), clients[-1:]) == 1
    assert answered(clients[-1:]) == [challenge_for(cur, clients[-1])]


def test_answers_in_all_are_bounded(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    reader, _, _ = armed(impl, server)
    captured = knock(op=Operation.REVOKE)
    assert send(server, reader, captured, clients[:1] * (ANSWERS + 3)) == ANSWERS + 3
    c = counts(reader)
    assert c["challenged"] == ANSWERS and c["capped"] == 3


def test_forged_copies_never_count(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    """Copies with the captured AUTH but another SALT (a bad MAC) from every peer first:
    none is recorded, so the real KNOCK is then answered for ``PEERS`` peers all the same."""
    reader, _, _ = armed(impl, server)
    captured = knock()
    forged = captured[:16] + os.urandom(8) + captured[24:]
    assert send(server, reader, forged, clients) == len(clients)
    c = counts(reader)
    assert c["mac"] == len(clients) and c["capped"] == 0 and c["challenged"] == 0
    assert send(server, reader, captured, clients[-PEERS:]) == PEERS
    assert counts(reader)["challenged"] == PEERS


def test_an_ungranted_knock_reaches_python_for_peers_peers_only(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    reader, rec, _ = armed(impl, server, grants=False)
    assert send(server, reader, knock(), clients) == len(clients)
    c = counts(reader)
    assert len(rec.got) == PEERS == c["handed_up"] and c["capped"] == len(clients) - PEERS


def test_a_new_epoch_forgets(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    reader, _, cur = armed(impl, server)
    captured = knock()
    send(server, reader, captured, clients)
    answered(clients)
    reader.set_secrets(cur, EPOCH + 1, cur)  # type: ignore[attr-defined]
    assert send(server, reader, captured, clients) == len(clients)
    assert counts(reader)["challenged"] == 2 * PEERS


def colliding_knocks(n: int) -> list[bytes]:
    """``n`` valid KNOCKs whose AUTHs share one set of the table under ``SEED``."""
    out: list[bytes] = []
    while len(out) < n:
        k = knock()
        if set_index(SEED, k[24:]) == 0:
            out.append(k)
    return out


def test_a_full_set_evicts_its_oldest(
    impl: SimpleNamespace, server: socket.socket, clients: list[socket.socket]
) -> None:
    """K0 capped; ``WAYS`` newer KNOCKs of its set evict it; then K0 is answered again (and
    its new entry evicts the next oldest)."""
    reader, _, _ = armed(impl, server)
    k0, *rest = colliding_knocks(WAYS + 1)
    send(server, reader, k0, clients)
    for k in rest:
        send(server, reader, k, clients[:1])
    send(server, reader, k0, clients[-1:])
    answered(clients)
    c = counts(reader)
    assert c["capped"] == len(clients) - PEERS and c["cap_evicted"] == 2
    assert c["challenged"] == PEERS + WAYS + 1


def test_c_and_py_cap_alike(server: socket.socket, clients: list[socket.socket]) -> None:
    """Differential: a few captured KNOCKs (some sharing a set, so that evictions happen)
    replayed from random peers, forged copies, fresh KNOCKs and an epoch change, through both
    readers with the same seed and secrets: same replies, hand-ups and counters."""
    if NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1")
    rng = random.Random(12)
    pool = colliding_knocks(WAYS + 2) + [knock() for _ in range(3)]
    pool.append(knock(op=Operation.REVOKE))
    plan = []
    for step in range(600):  # 600: a multiple of the 50 per drain
        k = rng.choice(pool) if rng.random() < 0.3 else pool[step % 2]  # two hot ones
        if rng.random() < 0.1:
            k = k[:16] + rng.randbytes(8) + k[24:]  # forged: the AUTH of a captured one
        elif rng.random() < 0.05:
            k = knock()
        plan.append((rng.randrange(len(clients)), k, step == 300))
    results = []
    secret = os.urandom(32)
    for name in ("py", "c"):
        ns = load_impl(name)
        reader, rec, _ = make(ns, server, cap_seed=SEED)
        cur = ns.mac.HmacKey(secret)
        reader.set_secrets(cur, EPOCH, None)  # type: ignore[attr-defined]
        reader.set_grants({USER << 32 | RES})  # type: ignore[attr-defined]
        for s in clients:
            s.setblocking(False)
        replies, totals = [], dict.fromkeys(ns.COUNTERS, 0)
        for i, (who, data, rotate) in enumerate(plan):
            if rotate:  # right after a drain: the epoch changes between two batches
                reader.set_secrets(cur, EPOCH + 1, cur)  # type: ignore[attr-defined]
            clients[who].sendto(data, dest(server))
            if i % 50 == 49:
                drain_until(reader, server, 50)
        for s in clients:
            while True:
                try:
                    replies.append((clients.index(s), s.recv(100)))
                except BlockingIOError:
                    break
        for field, value in counts(reader).items():
            totals[field] += value
        totals.pop("batches")
        results.append(([d for d, _ in rec.got], replies, totals))
    assert results[0] == results[1]
    got = results[1][2]
    assert got["capped"] > 100 and got["cap_evicted"] >= 1 and got["challenged"] > 2 * PEERS
