"""The batched readers' stateless challenges: KNOCK -> CHALLENGE and the RESPONSE check in
the reader, on both readers (``impl``) over real loopback sockets, and C against Python.

The expected CHALLENGE bytes come from ``knockd.challenges`` (the Python statement of the
token formula); the C reader computes them with its own code from the raw ``sockaddr``.
"""

from __future__ import annotations

import importlib
import os
import random
import socket
from types import SimpleNamespace

import pytest

from fastknock.knockd.challenges import challenge_bytes, token
from fastknock.knockd.peer import key_of
from fastknock.message import Operation
from tests.conftest import load_impl
from tests.test_recv import (
    KEY,
    NO_EXTENSIONS,
    OTHER_USER,
    RES,
    USER,
    client,
    counts,
    dest,
    drain_until,
    knock,
    make,
    raw,
)

EPOCH = 41
OTHER_RES = 0x99


def armed(ns: SimpleNamespace, srv: socket.socket, previous: bool = True):
    reader, rec, live = make(ns, srv)
    cur, prev = ns.mac.HmacKey(os.urandom(32)), ns.mac.HmacKey(os.urandom(32))
    reader.set_secrets(cur, EPOCH, prev if previous else None)  # type: ignore[attr-defined]
    reader.set_grants({USER << 32 | RES})  # type: ignore[attr-defined]
    return reader, rec, cur, prev


def response_for(
    ns: SimpleNamespace, secret: object, epoch: int, peer: tuple, op=Operation.KNOCK
) -> bytes:
    from fastknock._wire_py import pack

    tok = token(secret, epoch, op, USER, RES, key_of(peer))  # type: ignore[arg-type]
    salt = os.urandom(8)
    auth = ns.mac.HmacKey(KEY).sign(Operation.RESPONSE, USER, RES, salt, tok)
    return pack(Operation.RESPONSE, USER, RES, salt, auth)


def peer_of(c: socket.socket) -> tuple:
    if c.getsockname()[1] == 0:
        c.bind(("127.0.0.1", 0))
    return ("127.0.0.1", c.getsockname()[1])


def answer_once(reader: object, server: socket.socket, c: socket.socket) -> None:
    """The reader answers a KNOCK from ``c`` (so it admits RESPONSEs from it: ``asked``);
    the CHALLENGE and the counters are consumed."""
    peer_of(c)
    c.sendto(knock(), dest(server))
    assert drain_until(reader, server, 1) == 1
    c.settimeout(2)
    c.recv(100)
    reader.take()  # type: ignore[attr-defined]


def test_a_granted_knock_is_answered_in_the_reader(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, cur, _ = armed(impl, server)
    with client() as c:
        c.settimeout(2)
        for op in (Operation.KNOCK, Operation.REVOKE):
            c.sendto(knock(op=op), dest(server))
            assert drain_until(reader, server, 1) == 1
            tok = token(cur, EPOCH, op, USER, RES, key_of(peer_of(c)))
            assert c.recv(100) == challenge_bytes(tok, USER, RES)
    assert rec.got == []  # no Python object for either
    got = counts(reader)
    assert got["challenged"] == 2 and got["handed_up"] == 0 and got["dropped"] == 0


def test_a_knock_without_grant_or_secrets_goes_to_python(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, _, _ = armed(impl, server)
    reader.set_grants(set())  # type: ignore[attr-defined]
    plain, _, _ = make(impl, server)  # no secrets at all
    with client() as c:
        c.sendto(knock(), dest(server))
        assert drain_until(reader, server, 1) == 1
        c.sendto(knock(), dest(server))
        assert drain_until(plain, server, 1) == 1
    assert len(rec.got) == 1 and counts(reader)["handed_up"] == 1
    assert counts(plain)["handed_up"] == 1


def test_response_check_in_the_reader(impl: SimpleNamespace, server: socket.socket) -> None:
    reader, rec, cur, prev = armed(impl, server)
    with client() as c:
        me = peer_of(c)
        reader.set_secrets(prev, EPOCH - 1, None)  # type: ignore[attr-defined]
        answer_once(reader, server, c)  # in the previous epoch
        reader.set_secrets(cur, EPOCH, prev)  # type: ignore[attr-defined]
        answer_once(reader, server, c)  # and in this one
        good = [
            response_for(impl, cur, EPOCH, me),
            response_for(impl, prev, EPOCH - 1, me),
            response_for(impl, cur, EPOCH, me, Operation.REVOKE),
        ]
        bad = [
            response_for(impl, cur, EPOCH - 1, me),  # wrong epoch for the secret
            response_for(impl, cur, EPOCH, ("127.0.0.1", me[1] ^ 1)),  # another port
            response_for(impl, impl.mac.HmacKey(os.urandom(32)), EPOCH, me),  # forged
            raw(op=Operation.RESPONSE, auth=os.urandom(32)),
        ]
        for data in good + bad + [raw(op=Operation.RESPONSE, user=OTHER_USER)]:
            c.sendto(data, dest(server))
        assert drain_until(reader, server, len(good) + len(bad) + 1) == 8
    assert [d for d, _ in rec.got] == good
    got = counts(reader)
    assert got["response"] == len(bad) and got["unknown_user"] == 1 and got["handed_up"] == 3


def test_without_a_previous_secret_only_the_current_epoch_answers(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, cur, _ = armed(impl, server, previous=False)
    with client() as c:
        me = peer_of(c)
        answer_once(reader, server, c)
        # the reader uses the current secret in place of the missing one: masked out
        c.sendto(response_for(impl, cur, EPOCH - 1, me), dest(server))
        c.sendto(response_for(impl, cur, EPOCH, me), dest(server))
        assert drain_until(reader, server, 2) == 2
    assert len(rec.got) == 1 and counts(reader)["response"] == 1


def test_c_and_py_challenge_and_check_alike(server: socket.socket) -> None:
    """Differential: granted and ungranted KNOCKs, RESPONSEs of every epoch and port, and
    forgeries, through both readers with the same secrets: same replies, same hand-ups,
    same counters."""
    if NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1")
    rng = random.Random(11)
    secrets = [os.urandom(32), os.urandom(32)]
    py = SimpleNamespace(mac=importlib.import_module("fastknock._hmac_py"))
    py_cur, py_prev = (py.mac.HmacKey(x) for x in secrets)
    results = []
    with client() as c:
        c.setblocking(False)
        me = peer_of(c)
        kinds = [
            lambda: knock(op=rng.choice([Operation.KNOCK, Operation.REVOKE])),
            lambda: raw(op=Operation.KNOCK, user=OTHER_USER),
            lambda: response_for(py, rng.choice([py_cur, py_prev]), EPOCH - rng.randrange(3), me),
            lambda: raw(op=Operation.RESPONSE, auth=rng.randbytes(32)),
            lambda: rng.randbytes(56),
        ]
        data = [rng.choice(kinds)() for _ in range(300)]
        for name in ("py", "c"):
            ns = load_impl(name)
            reader, rec, _ = make(ns, server)
            cur, prev = (ns.mac.HmacKey(x) for x in secrets)
            grants = {USER << 32 | RES, OTHER_USER << 32 | RES}
            reader.set_grants(grants)  # type: ignore[attr-defined]
            reader.set_secrets(prev, EPOCH - 1, None)  # type: ignore[attr-defined]
            answer_once(reader, server, c)  # admitted in both epochs (``asked``)
            reader.set_secrets(cur, EPOCH, prev)  # type: ignore[attr-defined]
            c.setblocking(False)
            for i, d in enumerate(data):
                c.sendto(d, dest(server))
                if i % 50 == 49:
                    drain_until(reader, server, 50)
            replies: list[bytes] = []
            for _ in range(1000):
                try:
                    replies.append(c.recv(100))
                except BlockingIOError:
                    break
            got = counts(reader)
            got.pop("batches")
            results.append(([d for d, _ in rec.got], replies, got))
    assert results[0] == results[1]
    assert results[1][2]["challenged"] > 20 and results[1][2]["response"] > 20
    assert results[1][2]["handed_up"] > 10  # the valid RESPONSEs
