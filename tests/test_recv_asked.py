"""RESPONSE admission (``knockd.asked``): a batched reader checks a RESPONSE's tokens only if
it answered that peer in this or the previous epoch. The set alone, then on both readers
(``impl``) over real loopback sockets; C against Python in test_recv_challenges.py.

Each reader test sends a RESPONSE that answers a *valid* token for its peer: the only
reason it can be dropped is that the reader never answered that peer.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

from fastknock.knockd.asked import LIMIT, AskedPeers
from tests.test_recv import client, counts, dest, drain_until, knock
from tests.test_recv_challenges import EPOCH, answer_once, armed, peer_of, response_for

A, B = b"a" * 18, b"b" * 18


def test_generations_shift_and_clear() -> None:
    asked = AskedPeers()
    asked.add(A)
    assert asked.admits(A) and not asked.admits(B)
    asked.rotate(shift=True)  # the next epoch: A's token is still valid
    asked.add(B)
    assert asked.admits(A) and asked.admits(B)
    asked.rotate(shift=True)
    assert not asked.admits(A) and asked.admits(B)
    asked.rotate(shift=False)  # new secrets: every token is dead
    assert not asked.admits(B)


def test_a_full_or_forgotten_generation_admits_everyone() -> None:
    asked = AskedPeers()
    for i in range(LIMIT):
        asked.add(i.to_bytes(18, "big"))
    assert not asked.admits(B)
    asked.add(A)  # one more: the generation no longer knows whom it answered
    assert asked.admits(B)
    asked.rotate(shift=True)
    assert asked.admits(B)  # the previous generation is still unknown
    asked.rotate(shift=True)
    assert not asked.admits(B)
    asked.forget()
    assert asked.admits(B)


def sent(reader: object, server: socket.socket, c: socket.socket, data: bytes) -> dict:
    c.sendto(data, dest(server))
    assert drain_until(reader, server, 1) == 1
    return counts(reader)


def test_a_response_from_a_peer_never_answered_is_dropped_before_crypto(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, cur, _ = armed(impl, server)
    with client() as c:
        me = peer_of(c)
        got = sent(reader, server, c, response_for(impl, cur, EPOCH, me))
        assert got["response"] == 1 and rec.got == []
        answer_once(reader, server, c)  # control: once answered, the same kind passes
        good = response_for(impl, cur, EPOCH, me)
        assert sent(reader, server, c, good)["handed_up"] == 1 and rec.got[0][0] == good


def test_new_secrets_forget_and_the_next_epoch_keeps(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    reader, rec, cur, _ = armed(impl, server)
    with client() as c:
        me = peer_of(c)
        answer_once(reader, server, c)
        reader.set_secrets(cur, EPOCH, None)  # the same secrets again: nothing changes
        newer = impl.mac.HmacKey(os.urandom(32))
        reader.set_secrets(newer, EPOCH + 1, cur)  # the next epoch: still admitted
        assert sent(reader, server, c, response_for(impl, cur, EPOCH, me))["handed_up"] == 1
        early = impl.mac.HmacKey(os.urandom(32))
        reader.set_secrets(early, 0, None)  # an early rotation: nobody was answered
        assert sent(reader, server, c, response_for(impl, early, 0, me))["response"] == 1
    assert len(rec.got) == 1


def test_after_pass_rejects_every_response_is_checked(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    """While the reader hands everything up, Python answers the KNOCKs: the reader cannot
    know whom, so afterwards it admits every RESPONSE to the full check."""
    reader, rec, cur, _ = armed(impl, server)
    with client() as c:
        me = peer_of(c)
        reader.configure(reader.keyring, True)  # type: ignore[attr-defined]
        reader.configure(reader.keyring, False)  # type: ignore[attr-defined]
        assert sent(reader, server, c, response_for(impl, cur, EPOCH, me))["handed_up"] == 1


def test_a_full_generation_admits_every_response(
    impl: SimpleNamespace, server: socket.socket
) -> None:
    """``LIMIT`` + 1 peers answered (distinct KNOCKs from 127.1.x.y): the generation is
    unknown, so a RESPONSE from a peer never answered gets the full check (and passes)."""
    reader, rec, cur, _ = armed(impl, server)
    for i in range(LIMIT + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
            s.sendto(knock(), dest(server))
        if i % 64 == 63:
            drain_until(reader, server, 64)
    drain_until(reader, server, (LIMIT + 1) % 64)
    assert counts(reader)["challenged"] == LIMIT + 1
    with client() as c:
        me = peer_of(c)
        assert sent(reader, server, c, response_for(impl, cur, EPOCH, me))["handed_up"] == 1
