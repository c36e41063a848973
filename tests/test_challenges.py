"""Stateless UDP challenges (``knockd.challenges``) with an explicit clock.

The unit suite runs once on the pure-Python references (FASTKNOCK_NO_EXTENSIONS=1) and once
on the C extensions, so every test here covers both HMAC implementations.
"""

from __future__ import annotations

import os

import pytest

from fastknock import wire
from fastknock.knockd.challenges import Challenger, challenge_bytes, token
from fastknock.knockd.peer import key_of
from fastknock.mac import HmacKey
from fastknock.message import Operation
from fastknock.protocol import ClientSession

USER = 0x00000001
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
RES = 0x00000022
T = 5.0  # the control timeout = the epoch length
PEER = key_of(("192.0.2.1", 4000))


def knock_then_response(
    ch: Challenger, t_knock: float, op: Operation = Operation.KNOCK, peer: bytes = PEER
):
    c = ClientSession(HmacKey(KEY), USER, RES, op, os.urandom)
    first = wire.parse(c.start())
    challenge = ch.challenge(first, peer, t_knock)
    response = c.receive(challenge).send
    assert response is not None
    return challenge, wire.parse(response)


def answers(ch: Challenger, response: object, now: float, peer: bytes = PEER):
    return ch.match(response, HmacKey(KEY), peer, now)  # type: ignore[arg-type]


@pytest.mark.parametrize("t_knock", [0.0, 0.1, 2.5, 4.999])
def test_a_token_is_valid_for_at_least_one_timeout(t_knock: float) -> None:
    ch = Challenger(os.urandom, T, 0.0)
    _, response = knock_then_response(ch, t_knock)
    assert answers(ch, response, t_knock + T - 1e-6) is not None


@pytest.mark.parametrize("t_knock", [0.0, 0.1, 2.5, 4.999])
def test_a_token_dies_within_two_timeouts(t_knock: float) -> None:
    ch = Challenger(os.urandom, T, 0.0)
    _, response = knock_then_response(ch, t_knock)
    assert answers(ch, response, 2 * T) is None  # epoch 2: neither current nor previous
    assert answers(ch, response, t_knock + 2 * T + 0.001) is None


def test_epoch_boundary_previous_epoch_still_answers() -> None:
    ch = Challenger(os.urandom, T, 0.0)
    _, response = knock_then_response(ch, T - 0.001)  # issued in epoch 0
    got = answers(ch, response, T + 0.001)  # checked in epoch 1
    assert got is not None and got[0] is Operation.KNOCK and got[2] == 0


def test_retransmitted_knock_gets_the_same_challenge_within_an_epoch() -> None:
    ch = Challenger(os.urandom, T, 0.0)
    msg = wire.parse(ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom).start())
    a, b = ch.challenge(msg, PEER, 1.0), ch.challenge(msg, PEER, 4.0)
    assert a == b
    c = ch.challenge(msg, PEER, T + 1.0)  # next epoch: a new secret
    assert c != a
    parsed = wire.parse(a)
    assert parsed.operation == Operation.CHALLENGE and parsed.salt == parsed.auth[:8]


def test_knock_and_revoke_tokens_differ_and_the_match_says_which() -> None:
    ch = Challenger(os.urandom, T, 0.0)
    for op in (Operation.KNOCK, Operation.REVOKE):
        _, response = knock_then_response(ch, 1.0, op)
        got = answers(ch, response, 1.5)
        assert got is not None and got[0] is op
    first = wire.parse(ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom).start())
    assert token(ch.current, 0, Operation.KNOCK, USER, RES, PEER) != token(
        ch.current, 0, Operation.REVOKE, USER, RES, PEER
    )
    assert ch.challenge(first, PEER, 1.0) == challenge_bytes(
        token(ch.current, 0, Operation.KNOCK, USER, RES, PEER), USER, RES
    )


def test_the_token_binds_address_port_and_key() -> None:
    ch = Challenger(os.urandom, T, 0.0)
    _, response = knock_then_response(ch, 1.0)
    assert answers(ch, response, 1.5, key_of(("192.0.2.1", 4001))) is None
    assert answers(ch, response, 1.5, key_of(("192.0.2.2", 4000))) is None
    assert ch.match(response, HmacKey(bytes(32)), PEER, 1.5) is None  # another key
    assert answers(ch, response, 1.5) is not None


def test_replayed_response_is_refused_and_the_record_forgets_old_epochs() -> None:
    ch = Challenger(os.urandom, T, 0.0)
    _, response = knock_then_response(ch, 1.0)
    op, tok, epoch = answers(ch, response, 1.5)
    assert ch.consume(tok, epoch, 1.5, response.auth)
    assert not ch.consume(tok, epoch, 1.6, response.auth)  # the same RESPONSE again
    assert ch.used == 1
    ch.advance(2 * T + 0.1)  # two epochs on: the token can no longer match, record dropped
    assert ch.used == 0 and answers(ch, response, 2 * T + 0.1) is None


def test_full_record_rotates_early_and_outstanding_tokens_die() -> None:
    rotated: list[int] = []
    ch = Challenger(os.urandom, T, 0.0, max_used=3, on_rotate=lambda: rotated.append(1))
    peers = [key_of(("192.0.2.9", 5000 + i)) for i in range(5)]
    _, pending = knock_then_response(ch, 1.0, peer=peers[0])
    for peer in peers[1:4]:
        _, response = knock_then_response(ch, 1.0, peer=peer)
        _, tok, epoch = answers(ch, response, 1.1, peer)
        assert ch.consume(tok, epoch, 1.1, response.auth)
    assert ch.used == 3 and ch.rotations == 0
    _, response = knock_then_response(ch, 1.0, peer=peers[4])
    _, tok, epoch = answers(ch, response, 1.2, peers[4])
    assert ch.consume(tok, epoch, 1.2, response.auth)  # accepted: its secret is gone
    assert ch.rotations == 1 and rotated == [1] and ch.used == 0
    assert answers(ch, pending, 1.3, peers[0]) is None  # outstanding tokens died
    assert answers(ch, response, 1.3, peers[4]) is None  # the spent one cannot be replayed


def test_a_second_knock_from_the_same_port_in_the_window_is_not_a_replay() -> None:
    """The token is a function of (epoch, peer, user, resource, operation): two knocks from
    one source port within a window share it. The second RESPONSE has a MAC of its own
    (only a key holder can make one), so it is accepted; replaying either RESPONSE is not,
    and at most PER_TOKEN distinct RESPONSEs are accepted per token."""
    from fastknock.knockd.challenges import PER_TOKEN

    ch = Challenger(os.urandom, T, 0.0)
    responses = [knock_then_response(ch, 1.0 + i / 10)[1] for i in range(PER_TOKEN + 1)]
    matches = [answers(ch, r, 1.7) for r in responses]
    assert all(m is not None for m in matches) and len({m[1] for m in matches}) == 1
    spent = [ch.consume(m[1], m[2], 1.8, r.auth) for m, r in zip(matches, responses, strict=True)]
    assert spent == [True] * PER_TOKEN + [False]
    for m, r in zip(matches[:2], responses[:2], strict=True):
        assert not ch.consume(m[1], m[2], 1.9, r.auth)  # replays of spent RESPONSEs


def test_secrets_never_repeat_across_restarts() -> None:
    msg = wire.parse(ClientSession(HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom).start())
    seen = {Challenger(os.urandom, T, 0.0).challenge(msg, PEER, 1.0) for _ in range(20)}
    assert len(seen) == 20


def test_rotation_callback_and_next_rotation() -> None:
    calls: list[int] = []
    ch = Challenger(os.urandom, T, 0.0, on_rotate=lambda: calls.append(ch.epoch))
    assert ch.next_rotation == T
    ch.advance(T - 0.01)
    assert calls == []
    ch.advance(T)
    assert calls == [1] and ch.next_rotation == 2 * T and ch.previous is not None
    ch.advance(10 * T + 1)  # long idle: both secrets fresh
    assert calls == [1, 10] and ch.previous is None
