"""The KNOCK answer cap (``knockd.replaycap``): the table alone, then in the sans-I/O endpoint
with an explicit clock (the batched readers: test_recv_replay.py).

The cap's promise: a KNOCK that passed the MAC is answered for at most ``PEERS`` distinct
peers (and ``ANSWERS`` times in all) per epoch; a peer that was answered keeps its answers
(a retransmission); other KNOCKs, a new epoch and a full table never refuse anyone new;
nothing that fails the MAC is ever recorded.
"""

from __future__ import annotations

import os

from fastknock.conf.config import ErrorPolicy
from fastknock.knockd.counters import Count
from fastknock.knockd.endpoint import AskFirewall, Endpoint, SendDatagram
from fastknock.knockd.peer import key_of
from fastknock.knockd.replaycap import ANSWERS, PEERS, SETS, WAYS, ReplayCap, set_index
from fastknock.protocol import ClientSession
from tests import test_endpoint

SEED = bytes(range(16))
RES, OTHER_RES, TIMEOUT = test_endpoint.RES, 0x00000023, test_endpoint.TIMEOUT


def peer(i: int) -> bytes:
    return key_of((f"10.{i // 250}.{i % 250}.1", 1000 + i))


def auths_in_one_set(n: int, seed: bytes = SEED) -> list[bytes]:
    """``n`` AUTH values that share a set under ``seed``."""
    out: list[bytes] = []
    while len(out) < n:
        a = os.urandom(32)
        if set_index(seed, a) == 0:
            out.append(a)
    return out


# -- the table ------------------------------------------------------------------------------


def test_the_cap_counts_distinct_peers_and_keeps_answering_those() -> None:
    cap, auth = ReplayCap(SEED), os.urandom(32)
    for i in range(PEERS):
        assert not cap.refuses(auth, peer(i), 7)
        cap.record(auth, peer(i), 7)
    assert cap.refuses(auth, peer(PEERS), 7)  # a new peer: over the cap
    assert not cap.refuses(auth, peer(0), 7)  # an answered one: its retransmission
    assert not cap.refuses(os.urandom(32), peer(PEERS), 7)  # another KNOCK: unaffected


def test_answers_in_all_are_bounded_too() -> None:
    """A flood that spoofs an answered peer stops costing MACs after ``ANSWERS``."""
    cap, auth = ReplayCap(SEED), os.urandom(32)
    for _ in range(ANSWERS):
        assert not cap.refuses(auth, peer(0), 3)
        cap.record(auth, peer(0), 3)
    assert cap.refuses(auth, peer(0), 3) and cap.refuses(auth, peer(1), 3)
    assert ANSWERS > 5  # our client sends a KNOCK at most 1 + RETRANSMITS (4) times


def test_a_new_epoch_forgets() -> None:
    cap, auth = ReplayCap(SEED), os.urandom(32)
    for i in range(PEERS):
        cap.record(auth, peer(i), 7)
    assert cap.refuses(auth, peer(99), 7)
    assert not cap.refuses(auth, peer(99), 8)  # the next epoch: a new CHALLENGE, new count
    assert cap.entries(7) == 1 and cap.entries(8) == 0


def test_a_full_set_evicts_its_oldest_and_never_refuses_a_new_knock() -> None:
    """A full table only forgets (the evicted KNOCK is answered afresh); a stale entry is
    reused before anything current is evicted."""
    cap = ReplayCap(SEED)
    first, *rest = auths_in_one_set(WAYS + 1)
    for i in range(PEERS):
        cap.record(first, peer(i), 7)
    assert cap.refuses(first, peer(50), 7)
    for a in rest[:-1]:
        cap.record(a, peer(0), 7)
    assert cap.evicted == 0 and cap.entries(7) == WAYS  # the set is full
    assert not cap.refuses(rest[-1], peer(0), 7)
    assert cap.record(rest[-1], peer(0), 7)  # evicts the oldest: ``first``
    assert cap.evicted == 1 and cap.entries(7) == WAYS
    assert not cap.refuses(first, peer(50), 7)  # forgotten, so answered again
    assert all(not cap.refuses(a, peer(50), 7) for a in rest)
    # Next epoch: all eight ways are stale, so new entries evict nothing.
    for a in auths_in_one_set(WAYS)[:WAYS]:
        assert not cap.record(a, peer(1), 8)
    assert cap.evicted == 1 and cap.entries(8) == WAYS and cap.entries(7) == 0


def test_the_table_is_bounded() -> None:
    cap = ReplayCap(SEED)
    for i in range(SETS * WAYS * 2):
        cap.record(i.to_bytes(32, "little"), peer(0), 1)
    assert cap.entries(1) <= SETS * WAYS and cap.evicted >= SETS * WAYS


def test_the_set_depends_on_the_seed() -> None:
    """Somebody without the seed cannot tell which KNOCKs share a set."""
    auths = [os.urandom(32) for _ in range(64)]
    one = [set_index(SEED, a) for a in auths]
    other = [set_index(os.urandom(16), a) for a in auths]
    assert one != other and all(0 <= s < SETS for s in one + other)


# -- in the endpoint ------------------------------------------------------------------------


def endpoint(policy: ErrorPolicy = ErrorPolicy.BASIC_AUTH) -> Endpoint:
    return test_endpoint.endpoint(policy)[0]


def client(res: int = RES) -> ClientSession:
    return test_endpoint.client(res=res)


def addr(i: int) -> tuple:
    return (f"10.{i // 250}.{i % 250}.1", 1000 + i)


def replay(ep: Endpoint, data: bytes, peers: range, now: float) -> list[bytes]:
    """``data`` from each of ``peers``: the CHALLENGEs that went out."""
    for i in peers:
        ep.receive_datagram(data, key_of(addr(i)), addr(i), now)
    return [a.data for a in ep.actions() if isinstance(a, SendDatagram)]


def test_a_replay_gets_peers_answers_and_the_sender_keeps_its_own() -> None:
    """The legitimate client knocks, its CHALLENGE is lost; a captured copy of its KNOCK
    comes from 2,000 addresses; the client's retransmission (same bytes, same peer) still
    gets the same CHALLENGE and the knock completes. Control: no replay in between."""
    for attack in (False, True):
        ep, c = endpoint(), client()
        me = addr(9999)
        knock = c.start()
        first = replay(ep, knock, range(9999, 10000), 0.0)  # lost on the way back
        if attack:
            assert len(replay(ep, knock, range(2000), 0.5)) == PEERS - 1
            assert ep.counters[Count.KNOCK_REPLAY_CAPPED] == 2000 - (PEERS - 1)
        again = replay(ep, knock, range(9999, 10000), 1.0)
        assert again == first
        ep.receive_datagram(c.receive(again[0]).send, key_of(me), me, 1.1)
        assert [type(a) for a in ep.actions()] == [AskFirewall]
        assert ep.counters[Count.CHALLENGES] == 2 + (PEERS - 1 if attack else 0)


def test_the_endpoint_forgets_a_capped_knock_with_its_epoch() -> None:
    ep, knock = endpoint(), client().start()
    assert len(replay(ep, knock, range(100), 0.0)) == PEERS
    assert replay(ep, knock, range(100, 200), TIMEOUT - 0.1) == []
    assert len(replay(ep, knock, range(200, 300), TIMEOUT + 0.1)) == PEERS  # a new epoch


def test_forged_knocks_never_fill_the_endpoints_table() -> None:
    """10,000 KNOCKs with a wrong MAC, each from its own peer: nothing is recorded; then the
    captured KNOCK is capped as usual and a fresh KNOCK is answered."""
    ep = endpoint()
    good = client().start()
    for i in range(10_000):
        forged = good[:16] + os.urandom(8) + os.urandom(32)
        ep.receive_datagram(forged, key_of(addr(i)), addr(i), 1.0)
    assert ep.replays.entries(ep.challenger.epoch) == 0
    assert ep.counters[Count.OUTCOME_MAC] == 10_000 and ep.actions() == []
    assert len(replay(ep, good, range(50), 1.0)) == PEERS
    assert len(replay(ep, client().start(), range(50, 51), 1.0)) == 1


def test_a_refused_knock_that_passed_the_mac_is_capped_too() -> None:
    """A valid KNOCK for a resource the server does not have (rule 3) gets a GOAWAY under
    ``basic-auth``; replayed from many peers it gets at most ``PEERS`` of them."""
    ep = endpoint(ErrorPolicy.BASIC_AUTH)
    knock = client(OTHER_RES).start()
    for i in range(500):
        ep.receive_datagram(knock, key_of(addr(i)), addr(i), 1.0)
    sent = [a for a in ep.actions() if isinstance(a, SendDatagram)]
    assert len(sent) == PEERS and ep.counters[Count.CHALLENGES] == 0
    assert ep.counters[Count.OUTCOME_UNKNOWN_RESOURCE] == PEERS
    assert ep.counters[Count.KNOCK_REPLAY_CAPPED] == 500 - PEERS
