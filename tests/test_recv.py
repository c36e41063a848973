"""The batched UDP reader (``knockd._recv`` and its reference ``knockd._recv_py``).

Every test runs on both readers (``rimpl`` fixture: "py" = ``_recv_py`` with the Python key
ring, "c" = ``_recv`` with the C key ring) over real loopback sockets, with a recording
handler that plays the endpoint: it ``track()``s a peer key when it "opens a session" and
``untrack()``s it when the test ends one. The glue (``fastknock.knockd.recv``) is tested
in test_recv_control.py.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import random
import select
import socket
import time
from types import SimpleNamespace

import pytest

import fastknock.knockd.recv
from fastknock import _ext
from fastknock.knockd.counters import READER_FIELDS
from fastknock.knockd.peer import key_of
from fastknock.message import MAGIC, Operation
from fastknock.protocol import FIRST_OPS
from tests.conftest import load_impl

NO_EXTENSIONS = _ext.disabled()
USER = 0x00000001
OTHER_USER = 0x00000002
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
RES = 0x00000022
# The readers' take() fields, in order: the glue's map of them onto the endpoint's counters
# (counters.READER_FIELDS) is the one statement of the list.
FIELDS = tuple(READER_FIELDS)


@pytest.fixture
def rimpl(impl: SimpleNamespace) -> SimpleNamespace:
    """Both readers, each with its own key ring (the conftest ``impl`` fixture)."""
    return impl


class Recorder:
    """The handler: records (data, addr) and the keys; optionally opens a 'session' for the
    peer (tracks its key in the reader, as the endpoint does)."""

    def __init__(self, open_sessions: bool = False) -> None:
        self.got: list[tuple[bytes, tuple]] = []
        self.keys: list[bytes] = []
        self.live: set[bytes] = set()
        self.open_sessions = open_sessions
        self.fail_on: bytes | None = None
        self.end_on: dict[bytes, bytes] = {}  # data -> key of a session to end on it
        self.reader: object = None

    def __call__(self, data: bytes, key: bytes, addr: tuple) -> None:
        self.got.append((data, addr))
        self.keys.append(key)
        if data == self.fail_on:
            raise RuntimeError("handler bug")
        if data in self.end_on:
            self.end(self.end_on[data])
        elif self.open_sessions and key not in self.live:
            self.live.add(key)
            self.reader.track(key)  # type: ignore[attr-defined]

    def end(self, key: bytes) -> None:
        self.live.discard(key)
        self.reader.untrack(key)  # type: ignore[attr-defined]


def knock(user: int = USER, key: bytes = KEY, op: Operation = Operation.KNOCK) -> bytes:
    from fastknock._hmac_py import HmacKey
    from fastknock._wire_py import pack

    salt = os.urandom(8)
    return pack(op, user, RES, salt, HmacKey(key).sign(op, user, RES, salt))


def raw(magic: int = MAGIC, op: int = 0, user: int = USER, auth: bytes = b"\0" * 32) -> bytes:
    return (
        magic.to_bytes(4, "big")
        + op.to_bytes(4, "big")
        + user.to_bytes(4, "big")
        + RES.to_bytes(4, "big")
        + b"S" * 8
        + auth
    )


def client() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def dest(server: socket.socket) -> tuple[str, int]:
    return ("127.0.0.1", server.getsockname()[1])


def make(
    rimpl: SimpleNamespace, server: socket.socket, **kw: object
) -> tuple[object, Recorder, set[bytes]]:
    rec = Recorder(open_sessions=bool(kw.pop("open_sessions", False)))
    kw.setdefault("allowed_ops", FIRST_OPS)
    reader = rimpl.Reader(server, rimpl.mac.KeyRing({USER: KEY}), rec, **kw)
    rec.reader = reader
    return reader, rec, rec.live


def drain_until(reader: object, server: socket.socket, n: int, limit: float = 5.0) -> int:
    """Drain until ``n`` datagrams were read (the loopback delivers synchronously, but be
    patient rather than flaky); returns how many were read."""
    total = 0
    end = time.monotonic() + limit
    while total < n and time.monotonic() < end:
        select.select([server], [], [], 0.05)
        total += reader.drain()  # type: ignore[attr-defined]
    return total


def counts(reader: object) -> dict[str, int]:
    return dict(zip(FIELDS, reader.take(), strict=True))  # type: ignore[attr-defined]


# -- build ---------------------------------------------------------------------------------


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")
def test_extension_is_compiled_and_selected() -> None:
    module = importlib.import_module("fastknock.knockd._recv")
    assert module.__file__ is not None and module.__file__.endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )
    assert fastknock.knockd.recv.IMPLEMENTATION == "c"
    assert fastknock.knockd.recv.Reader.__module__ == "fastknock.knockd._recv"


@pytest.mark.skipif(not NO_EXTENSIONS, reason="only with FASTKNOCK_NO_EXTENSIONS=1")
def test_selector_uses_py_when_disabled() -> None:
    assert fastknock.knockd.recv.IMPLEMENTATION == "py"


def test_counter_fields_agree(rimpl: SimpleNamespace) -> None:
    assert tuple(rimpl.COUNTERS) == FIELDS


# -- decisions -----------------------------------------------------------------------------


def test_junk_is_dropped_and_counted_per_reason(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, _ = make(rimpl, server)
    junk = [
        b"",
        b"x" * 55,
        b"x" * 57,
        b"x" * 1000,
        raw(magic=0x12345678),
        raw(op=Operation.RESPONSE),
        raw(op=9),
        raw(user=OTHER_USER),
        raw(auth=os.urandom(32)),
        raw(auth=os.urandom(32)),
    ]
    with client() as c:
        for data in junk:
            c.sendto(data, dest(server))
        assert drain_until(reader, server, len(junk)) == len(junk)
    assert rec.got == []
    got = counts(reader)
    assert got["dropped"] == len(junk)
    assert (got["size"], got["magic"], got["operation"], got["unknown_user"], got["mac"]) == (
        4,
        1,
        1,
        1,
        2,
    )
    assert got["response"] == 1  # a RESPONSE that answers no computed token
    assert got["handed_up"] == 0 and got["errors"] == 0
    assert counts(reader)["dropped"] == 0  # take() resets


def test_valid_first_messages_are_handed_up_with_the_socket_address(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, _ = make(rimpl, server)
    msgs = [knock(), knock(op=Operation.REVOKE)]
    with client() as c:
        for m in msgs:
            c.sendto(m, dest(server))
        port = c.getsockname()[1]
        assert drain_until(reader, server, 2) == 2
    assert [d for d, _ in rec.got] == msgs
    # The same address shape as socket.recvfrom gives on this socket.
    if server.family == socket.AF_INET6:
        expected: tuple = ("::ffff:127.0.0.1", port, 0, 0)
    else:
        expected = ("127.0.0.1", port)
    assert [a for _, a in rec.got] == [expected, expected]
    # The binary key: the IPv4-mapped address and the port, as knockd.peer builds it.
    assert rec.keys == [key_of(expected)] * 2
    assert rec.keys[0] == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]) + port.to_bytes(2, "big")
    got = counts(reader)
    assert got["handed_up"] == 2 and got["dropped"] == 0 and got["batches"] >= 1


def test_live_peer_gets_everything_of_56_bytes(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    """Once the handler opened a session for a peer, its RESPONSEs (which fail the
    first-message check) and even junk of the right size reach Python; wrong sizes never."""
    reader, rec, peers = make(rimpl, server, open_sessions=True)
    stranger_response = raw(op=Operation.RESPONSE)
    with client() as c, client() as other:
        c.sendto(knock(), dest(server))
        assert drain_until(reader, server, 1) == 1
        assert len(peers) == 1
        follow = [raw(op=Operation.RESPONSE), raw(magic=1), b"short"]
        for data in follow:
            c.sendto(data, dest(server))
        other.sendto(stranger_response, dest(server))  # no session: dropped
        assert drain_until(reader, server, 4) == 4
    assert [d for d, _ in rec.got] == [rec.got[0][0], *follow[:2]]
    got = counts(reader)
    assert got["live_hits"] == 2 and got["handed_up"] == 3
    assert got["size"] == 1 and got["response"] == 1 and got["dropped"] == 2
    assert reader.tracked == 1  # type: ignore[attr-defined]


def test_ended_session_is_forgotten(rimpl: SimpleNamespace, server: socket.socket) -> None:
    """Once the endpoint untracks the key, the peer's junk is dropped again at once."""
    reader, rec, peers = make(rimpl, server, open_sessions=True)
    with client() as c:
        c.sendto(knock(), dest(server))
        assert drain_until(reader, server, 1) == 1
        rec.open_sessions = False
        rec.end(next(iter(peers)))
        assert reader.tracked == 0  # type: ignore[attr-defined]
        before = len(rec.got)
        for _ in range(3):
            c.sendto(raw(op=Operation.RESPONSE), dest(server))
        assert drain_until(reader, server, 3) == 3
    assert len(rec.got) == before
    assert counts(reader)["response"] >= 3


def test_datagrams_after_a_session_start_in_the_same_batch_follow_it(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    """KNOCK then junk from the same peer, read in one batch: as on the one-by-one path,
    the junk goes to the session the KNOCK started (and ends it there)."""
    reader, rec, _ = make(rimpl, server, open_sessions=True)
    first = knock()
    with client() as c, client() as other:
        c.sendto(first, dest(server))
        c.sendto(raw(magic=7), dest(server))
        other.sendto(raw(magic=7), dest(server))
        time.sleep(0.05)
        assert drain_until(reader, server, 3) == 3
    assert [d for d, _ in rec.got] == [first, raw(magic=7)]
    got = counts(reader)
    assert got["live_hits"] == 1 and got["magic"] == 1


def test_a_session_start_is_followed_even_when_another_ends_in_the_same_batch(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    """Peer B has a session; one batch holds B's last datagram (its session ends on it),
    then A's KNOCK (A's session starts), then A's RESPONSE-shaped follow-up. The follow-up
    belongs to A's new session and must be handed up, although the number of live
    sessions did not grow in that batch (the old C reader compared counts and lost it)."""
    reader, rec, peers = make(rimpl, server, open_sessions=True)
    first_b, last_b, knock_a, follow_a = knock(), raw(op=Operation.RESPONSE), knock(), raw(op=5)
    with client() as a, client() as b:
        b.sendto(first_b, dest(server))
        assert drain_until(reader, server, 1) == 1
        (key_b,) = peers
        rec.end_on[last_b] = key_b
        b.sendto(last_b, dest(server))
        a.sendto(knock_a, dest(server))
        a.sendto(follow_a, dest(server))
        time.sleep(0.05)
        assert drain_until(reader, server, 3) == 3
    assert [d for d, _ in rec.got] == [first_b, last_b, knock_a, follow_a]
    assert reader.tracked == 1  # type: ignore[attr-defined]


def test_pass_rejects_hands_up_every_56_byte_datagram(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, _ = make(rimpl, server, pass_rejects=True)
    data = [raw(magic=1), raw(user=OTHER_USER), raw(auth=os.urandom(32)), b"x" * 57]
    with client() as c:
        for d in data:
            c.sendto(d, dest(server))
        assert drain_until(reader, server, 4) == 4
    assert [d for d, _ in rec.got] == data[:3]
    got = counts(reader)
    assert got["handed_up"] == 3 and got["dropped"] == got["size"] == 1


def test_configure_swaps_key_ring_and_policy(rimpl: SimpleNamespace, server: socket.socket) -> None:
    reader, rec, _ = make(rimpl, server)
    new_key = bytes(range(32))
    ring = rimpl.mac.KeyRing({OTHER_USER: new_key})
    reader.configure(ring, False)  # type: ignore[attr-defined]
    assert reader.keyring is ring  # type: ignore[attr-defined]
    with client() as c:
        c.sendto(knock(), dest(server))  # USER is no longer known
        c.sendto(knock(OTHER_USER, new_key), dest(server))
        assert drain_until(reader, server, 2) == 2
    assert len(rec.got) == 1 and counts(reader)["unknown_user"] == 1


def test_budget_bounds_one_drain(rimpl: SimpleNamespace, server: socket.socket) -> None:
    reader, _, _ = make(rimpl, server, budget=1)
    with client() as c:
        for _ in range(150):
            c.sendto(b"junk", dest(server))
        select.select([server], [], [], 1)
        time.sleep(0.05)
        assert reader.drain() == 64  # type: ignore[attr-defined]
        assert drain_until(reader, server, 86) == 86
    got = counts(reader)
    assert got["size"] == 150 and got["batches"] >= 3


def test_handler_exception_is_counted_and_the_batch_goes_on(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, _ = make(rimpl, server)
    msgs = [knock() for _ in range(3)]
    rec.fail_on = msgs[1]
    with client() as c:
        for m in msgs:
            c.sendto(m, dest(server))
        assert drain_until(reader, server, 3) == 3
    assert [d for d, _ in rec.got] == msgs
    assert counts(reader)["errors"] == 1


def test_empty_socket_drains_nothing(rimpl: SimpleNamespace, server: socket.socket) -> None:
    reader, _, _ = make(rimpl, server)
    assert reader.drain() == 0  # type: ignore[attr-defined]
    assert counts(reader)["batches"] == 0


def test_bad_arguments(rimpl: SimpleNamespace, server: socket.socket) -> None:
    ring = rimpl.mac.KeyRing({USER: KEY})
    with pytest.raises(ValueError):
        rimpl.Reader(server, ring, print, budget=0)
    with pytest.raises(TypeError):
        rimpl.Reader(server, None, print)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    with pytest.raises((ValueError, OSError)):
        rimpl.Reader(closed, ring, print)
    reader = rimpl.Reader(server, ring, print)
    with pytest.raises(ValueError):
        reader.track(b"short")


def test_live_set_stays_bounded_by_the_sessions(
    rimpl: SimpleNamespace, server: socket.socket
) -> None:
    """Sessions from 600 source ports start and end; the set tracks exactly the live ones,
    and a live peer is never lost while others churn."""
    reader, rec, peers = make(rimpl, server, open_sessions=True)
    with client() as keeper:
        keeper.sendto(knock(), dest(server))
        assert drain_until(reader, server, 1) == 1
        keep_key = next(iter(peers))
        for _ in range(20):
            socks = [client() for _ in range(30)]
            for s in socks:
                s.sendto(knock(), dest(server))
            assert drain_until(reader, server, 30) == 30
            for s in socks:
                rec.end(key_of(("127.0.0.1", s.getsockname()[1])))
                s.close()
            assert reader.tracked == len(peers) == 1  # type: ignore[attr-defined]
        assert list(peers) == [keep_key]
        before = len(rec.got)
        keeper.sendto(raw(op=Operation.RESPONSE), dest(server))
        assert drain_until(reader, server, 1) == 1
        assert len(rec.got) == before + 1  # the keeper's RESPONSE still reaches Python


def test_c_and_py_agree_on_a_random_mix(server: socket.socket) -> None:
    """Differential: the same datagram sequence through both readers gives the same
    hand-ups and the same counters."""
    if NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1")
    rng = random.Random(5)
    kinds = [
        lambda: knock(),
        lambda: raw(magic=rng.getrandbits(32)),
        lambda: raw(op=rng.randrange(6)),
        lambda: raw(user=rng.choice([USER, OTHER_USER])),
        lambda: raw(auth=rng.randbytes(32)),
        lambda: rng.randbytes(rng.randrange(120)),
    ]
    data = [rng.choice(kinds)() for _ in range(400)]
    results = []
    for name in ("py", "c"):
        reader, rec, _ = make(load_impl(name), server)
        with client() as c:
            for i, d in enumerate(data):
                c.sendto(d, dest(server))
                if i % 50 == 49:
                    drain_until(reader, server, 50)
        results.append(([d for d, _ in rec.got], counts(reader)))
    (py_got, py_counts), (c_got, c_counts) = results
    assert py_got == c_got
    py_counts.pop("batches")
    c_counts.pop("batches")
    assert py_counts == c_counts
