"""Batches of KNOCK MACs, four at a time (``KeyRing.check_batch`` / ``verify_knocks``, the
4-way AVX2 permutation of ``keccak4.h``): the same reasons as ``check()`` one by one, on
the vector path and on its scalar fallback, against the pure-Python reference (hashlib).

Each batch mixes valid KNOCKs and REVOKEs of several users (each its own key, so the four
ways of one permutation carry different keyed states), forged ones (one bit of the AUTH or
of the signed head flipped), unknown users, wrong sizes, magics and operations, in random
order and every batch length from 0 to 13 (idle ways, a lone MAC, several groups).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from fastknock import _hmac_py, _wire_py
from fastknock.message import Operation, Reason
from tests.conftest import NO_EXTENSIONS

pytestmark = pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")

USERS = {u: os.urandom(32) for u in (3, 7, 0x10000001, 0xFFFFFFFF, 42)}


@pytest.fixture(params=[True, False], ids=["vector", "scalar"])
def vector(request: pytest.FixtureRequest) -> Iterator[bool]:
    from fastknock import _hmac

    before = _hmac.vector_macs()
    _hmac.vector_macs(request.param)
    yield request.param
    _hmac.vector_macs(before)


def signed(rng: random.Random, user: int, op: Operation = Operation.KNOCK) -> bytes:
    salt = rng.randbytes(8)
    res = rng.getrandbits(32)
    auth = _hmac_py.HmacKey(USERS[user]).sign(op, user, res, salt)
    return _wire_py.pack(op, user, res, salt, auth)


def flipped(data: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    i = rng.randrange(lo, hi)
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]


def datagram(rng: random.Random) -> bytes:
    user = rng.choice(sorted(USERS))
    kind = rng.random()
    if kind < 0.3:
        return signed(rng, user, rng.choice([Operation.KNOCK, Operation.REVOKE]))
    if kind < 0.55:
        return flipped(signed(rng, user), rng, 24, 56)  # the AUTH
    if kind < 0.7:
        return flipped(signed(rng, user), rng, 16, 24)  # the SALT: signed, so the MAC fails
    if kind < 0.8:
        return signed(rng, user)[:8] + (1234).to_bytes(4, "big") + rng.randbytes(44)
    if kind < 0.9:
        return rng.randbytes(rng.choice([0, 55, 57, 100]))
    return flipped(signed(rng, user), rng, 0, 8)  # magic or operation


def test_a_batch_gets_the_reasons_of_one_by_one(vector: bool) -> None:
    from fastknock import _hmac

    c_ring, py_ring = _hmac.KeyRing(USERS), _hmac_py.KeyRing(USERS)
    rng = random.Random(2026)
    seen: set[int] = set()
    for length in list(range(14)) * 40:
        batch = [datagram(rng) for _ in range(length)]
        want = py_ring.check_batch(batch)
        assert c_ring.check_batch(batch) == want
        assert want == [c_ring.check(d)[0] for d in batch]
        seen.update(want)
    assert {Reason.OK, Reason.MAC, Reason.SIZE, Reason.UNKNOWN_USER} <= seen


def test_one_valid_knock_among_forged_ones_of_the_same_user(vector: bool) -> None:
    """Four ways of one permutation, the same key: only the right one passes, wherever it
    sits."""
    from fastknock import _hmac

    ring = _hmac.KeyRing(USERS)
    rng = random.Random(5)
    good = signed(rng, 7)
    for at in range(4):
        batch = [flipped(good, rng, 24, 56) for _ in range(4)]
        batch[at] = good
        assert ring.check_batch(batch) == [Reason.OK if i == at else Reason.MAC for i in range(4)]


def test_check_batch_takes_any_buffer_and_checks_allowed_ops() -> None:
    from fastknock import _hmac

    ring = _hmac.KeyRing(USERS)
    good = signed(random.Random(1), 3)
    assert ring.check_batch([bytearray(good), memoryview(good), good]) == [Reason.OK] * 3
    assert ring.check_batch([good], allowed_ops=1 << Operation.REVOKE) == [Reason.OPERATION]
    with pytest.raises(TypeError):
        ring.check_batch([good], allowed_ops=1.0)
    with pytest.raises(OverflowError):
        ring.check_batch([good], allowed_ops=-1)


def test_the_switch_reports_the_cpu() -> None:
    """On by default exactly when the CPU has AVX2 (x86-64); off when switched off; the
    reference never has it."""
    from fastknock import _hmac

    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    has_avx2 = "avx2" in flags.split()
    assert _hmac.vector_macs() == has_avx2
    try:
        assert _hmac.vector_macs(False) is False
    finally:
        _hmac.vector_macs(True)
    assert _hmac.vector_macs() == has_avx2
    assert _hmac_py.vector_macs(True) is False
