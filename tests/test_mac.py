"""HMAC-SHA3-256 keys and the fused KeyRing.check, on both implementations.

Oracles: PROTOCOL.md's known-answer vectors, the standard library's
``hmac.digest(key, data, "sha3_256")`` (OpenSSL) and pycryptodome's HMAC/SHA3_256.
Invariant of ``KeyRing.check``: any bytes -> ``(Reason, Message | None)``, never an
exception; C and Python give the same answer.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from Crypto.Hash import HMAC as CryptoHMAC
from Crypto.Hash import SHA3_256 as CryptoSHA3_256
from hypothesis import given
from hypothesis import strategies as st

from fastknock import _ext
from fastknock.errors import WireError
from fastknock.message import MAGIC, ZERO_CHALLENGE, Message, Operation, Reason

# Test vectors from letmein's own test suite, as restated in docs/PROTOCOL.md
# ("Authentication", test vectors 1-3).
KEY1 = b"\x9e" * 32
USER1, RES1, SALT1 = 0xA423DDA7, 0xBC5D8077, b"\x4a" * 8
AUTH_KNOCK = bytes.fromhex("6399e5e0ff16219a5ebf6299c41dca189a2f7619bd0ab2ea5f81b8aef9fe0600")
AUTH_REVOKE = bytes.fromhex("b4bb7a905b52ef9d7eddbb030a7f7bd75d565a880ff3cb83a54e64a676828ef8")
KEY3 = b"\x6b" * 32
USER3, RES3, SALT3, CHALLENGE3 = 0x280D04F3, 0xE2EE7397, b"\x62" * 8, b"\xb8" * 32
AUTH_RESPONSE = bytes.fromhex("ac41973381d5934958ac028899fb90a130bc94eb6e8c54808d21931debb9ca2a")

VECTORS = [
    (KEY1, Operation.KNOCK, USER1, RES1, SALT1, ZERO_CHALLENGE, AUTH_KNOCK),
    (KEY1, Operation.REVOKE, USER1, RES1, SALT1, ZERO_CHALLENGE, AUTH_REVOKE),
    (KEY3, Operation.RESPONSE, USER3, RES3, SALT3, CHALLENGE3, AUTH_RESPONSE),
]

u32s = st.integers(min_value=0, max_value=0xFFFFFFFF)


def datagram(op: int, user: int, resource: int, salt: bytes, auth: bytes) -> bytes:
    return struct.pack(">IIII", MAGIC, op, user, resource) + salt + auth


def knock(op: int = Operation.KNOCK, key: bytes = KEY1, user: int = USER1) -> bytes:
    auth = hmac.digest(
        key, struct.pack(">III", op, user, RES1) + SALT1 + ZERO_CHALLENGE, "sha3_256"
    )
    return datagram(op, user, RES1, SALT1, auth)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the type is what is compared
        return "raise", type(exc)


# --- known answers ------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=["knock", "revoke", "response"])
def test_protocol_vectors(impl: SimpleNamespace, vector: tuple[Any, ...]) -> None:
    key_bytes, op, user, res, salt, challenge, auth = vector
    # the vector input is exactly OPERATION || USER || RESOURCE || SALT || CHALLENGE
    data = struct.pack(">III", op, user, res) + salt + challenge
    assert hmac.digest(key_bytes, data, "sha3_256") == auth
    key = impl.mac.HmacKey(key_bytes)
    assert key.sign(op, user, res, salt, challenge) == auth
    assert key.digest(data) == auth
    assert key.verify(op, user, res, salt, auth, challenge) is True
    assert key.verify_message(Message(op, user, res, salt, auth), challenge) is True


def test_zero_challenge_is_the_default(impl: SimpleNamespace) -> None:
    key = impl.mac.HmacKey(KEY1)
    assert key.sign(Operation.KNOCK, USER1, RES1, SALT1) == AUTH_KNOCK
    assert key.verify(Operation.KNOCK, USER1, RES1, SALT1, AUTH_KNOCK)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("field", ["operation", "user", "resource", "salt", "auth", "challenge"])
def test_tampering_any_field_fails(impl: SimpleNamespace, field: str) -> None:
    key = impl.mac.HmacKey(KEY3)
    good: dict[str, Any] = {
        "operation": Operation.RESPONSE,
        "user": USER3,
        "resource": RES3,
        "salt": SALT3,
        "auth": AUTH_RESPONSE,
        "challenge": CHALLENGE3,
    }
    assert key.verify(**good)
    value = good[field]
    variants: list[Any]
    if isinstance(value, bytes):
        variants = [flip(value, i) for i in range(len(value))]
    else:
        variants = [value ^ (1 << bit) for bit in range(32)]
    for variant in variants:
        assert key.verify(**{**good, field: variant}) is False, (field, variant)


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_verify_wrong_length_auth_is_false(impl: SimpleNamespace, size: int) -> None:
    key = impl.mac.HmacKey(KEY1)
    auth = (AUTH_KNOCK * 2)[:size]
    assert key.verify(Operation.KNOCK, USER1, RES1, SALT1, auth) is False


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_buffers_accepted(impl: SimpleNamespace, wrap: Any) -> None:
    key = impl.mac.HmacKey(wrap(KEY1))
    assert key.verify(Operation.KNOCK, USER1, RES1, wrap(SALT1), wrap(AUTH_KNOCK))
    assert key.sign(Operation.KNOCK, USER1, RES1, wrap(SALT1), wrap(ZERO_CHALLENGE)) == AUTH_KNOCK
    assert key.digest(wrap(b"abc")) == hmac.digest(KEY1, b"abc", "sha3_256")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 1, 2, bytes(7)), WireError),
        ((0, 1, 2, bytes(9)), WireError),
        ((0, 1, 2, bytes(8), bytes(31)), WireError),
        ((0, -1, 2, bytes(8)), WireError),
        ((0, 1, 2**32, bytes(8)), WireError),
        ((2**32, 1, 2, bytes(8)), WireError),
        ((0, "1", 2, bytes(8)), TypeError),
        ((0, 1, 2, "salt1234"), TypeError),
        ((0, 1, 2, bytes(8), None), TypeError),
    ],
)
def test_sign_rejects_bad_arguments(
    impl: SimpleNamespace, args: tuple[Any, ...], error: type[Exception]
) -> None:
    key = impl.mac.HmacKey(KEY1)
    with pytest.raises(error):
        key.sign(*args)
    with pytest.raises(error):
        key.verify(*args[:4], AUTH_KNOCK, *args[4:])


@pytest.mark.parametrize("key_size", [0, 1, 32, 135, 136, 137, 200, 272, 273, 1000])
@pytest.mark.parametrize("data_size", [0, 52, 135, 136, 137, 271, 272, 273, 1000, 5000])
def test_digest_block_boundaries(impl: SimpleNamespace, key_size: int, data_size: int) -> None:
    key_bytes = bytes((i * 7 + 3) & 0xFF for i in range(key_size))
    data = bytes((i * 13 + 1) & 0xFF for i in range(data_size))
    assert impl.mac.HmacKey(key_bytes).digest(data) == hmac.digest(key_bytes, data, "sha3_256")


@given(key=st.binary(max_size=300), data=st.binary(max_size=500))
def test_digest_matches_stdlib(impl: SimpleNamespace, key: bytes, data: bytes) -> None:
    """Checks Keccak-f[1600] and the sponge against OpenSSL, multi-block included."""
    assert impl.mac.HmacKey(key).digest(data) == hmac.digest(key, data, "sha3_256")


@pytest.mark.parametrize(("key_size", "data_size"), [(0, 0), (32, 52), (136, 136), (300, 500)])
def test_digest_matches_pycryptodome(impl: SimpleNamespace, key_size: int, data_size: int) -> None:
    key = bytes(range(256))[::-1] * 2
    key, data = key[:key_size], (b"fastknock" * 60)[:data_size]
    oracle = CryptoHMAC.new(key, data, digestmod=CryptoSHA3_256).digest()
    assert impl.mac.HmacKey(key).digest(data) == oracle


def test_long_key_is_hashed_first(impl: SimpleNamespace) -> None:
    long_key = bytes(range(200))
    hashed = hashlib.sha3_256(long_key).digest()
    assert impl.mac.HmacKey(long_key).digest(b"x") == impl.mac.HmacKey(hashed).digest(b"x")


@given(
    key=st.binary(min_size=32, max_size=32),
    op=u32s,
    user=u32s,
    res=u32s,
    salt=st.binary(min_size=8, max_size=8),
    challenge=st.binary(min_size=32, max_size=32),
)
def test_c_sign_matches_py(
    both: tuple[SimpleNamespace, ...],
    key: bytes,
    op: int,
    user: int,
    res: int,
    salt: bytes,
    challenge: bytes,
) -> None:
    py, c = both
    auth = py.mac.HmacKey(key).sign(op, user, res, salt, challenge)
    assert c.mac.HmacKey(key).sign(op, user, res, salt, challenge) == auth
    assert c.mac.HmacKey(key).verify(op, user, res, salt, auth, challenge)


# --- secrets stay secret ------------------------------------------------------------


def test_repr_redacts_keys(impl: SimpleNamespace) -> None:
    secret = bytes.fromhex("0123456789abcdef" * 4)
    key = impl.mac.HmacKey(secret)
    ring = impl.mac.KeyRing({USER1: secret})
    for text in (repr(key), str(key), repr(ring), str(ring)):
        assert secret.hex() not in text.lower()
        assert repr(secret) not in text
        assert "0123456789" not in text
    assert "redacted" in repr(key)
    assert not hasattr(key, "key")


def test_not_picklable(impl: SimpleNamespace) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(impl.mac.HmacKey(KEY1))
    with pytest.raises(TypeError):
        pickle.dumps(impl.mac.KeyRing({USER1: KEY1}))


def test_c_key_state_not_reachable() -> None:
    if _ext.disabled():
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1: no C extension")
    from fastknock import _hmac

    key = _hmac.HmacKey(KEY1)
    public = [name for name in dir(key) if not name.startswith("__")]
    assert sorted(public) == ["digest", "sign", "verify", "verify_message"]
    with pytest.raises(AttributeError):
        key.st  # type: ignore[attr-defined]  # noqa: B018


# --- KeyRing ------------------------------------------------------------------------


@pytest.fixture
def ring(impl: SimpleNamespace) -> Any:
    return impl.mac.KeyRing({USER1: KEY1, USER3: KEY3})


def test_keyring_lookup(impl: SimpleNamespace, ring: Any) -> None:
    assert len(ring) == 2
    assert USER1 in ring and USER3 in ring
    assert 0 not in ring and "x" not in ring and -1 not in ring and 2**40 not in ring
    key = ring.get(USER1)
    assert key is not None and key.sign(Operation.KNOCK, USER1, RES1, SALT1) == AUTH_KNOCK
    for missing in (0, USER1 + 1, -1, 2**32, "x", None, 1.5):
        assert ring.get(missing) is None
    assert len(impl.mac.KeyRing({})) == 0


@pytest.mark.parametrize(("user", "error"), [(-1, WireError), (2**32, WireError), ("1", TypeError)])
def test_keyring_rejects_bad_user_ids(
    impl: SimpleNamespace, user: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        impl.mac.KeyRing({user: KEY1})


@pytest.mark.parametrize("op", [Operation.KNOCK, Operation.REVOKE])
def test_check_accepts(ring: Any, op: Operation) -> None:
    data = knock(op)
    reason, msg = ring.check(data)
    assert reason == Reason.OK and isinstance(reason, Reason)
    assert msg == Message(op, USER1, RES1, SALT1, data[24:])
    assert type(msg) is Message and msg.operation is op
    for wrap in (bytearray, memoryview):
        assert ring.check(wrap(data)) == (Reason.OK, msg)


def test_check_vector_datagrams(ring: Any) -> None:
    assert ring.check(datagram(Operation.KNOCK, USER1, RES1, SALT1, AUTH_KNOCK))[0] == Reason.OK
    assert ring.check(datagram(Operation.REVOKE, USER1, RES1, SALT1, AUTH_REVOKE))[0] == Reason.OK
    # the KNOCK's AUTH does not authenticate a REVOKE
    assert ring.check(datagram(Operation.REVOKE, USER1, RES1, SALT1, AUTH_KNOCK))[0] == Reason.MAC


def test_check_rejection_reasons(ring: Any) -> None:
    good = knock()
    cases: list[tuple[bytes, Reason]] = [
        (b"", Reason.SIZE),
        (good[:55], Reason.SIZE),
        (good + b"\0", Reason.SIZE),
        (good * 2, Reason.SIZE),
        (flip(good, 0), Reason.MAGIC),
        (flip(good, 3), Reason.MAGIC),
        (knock(Operation.CHALLENGE), Reason.OPERATION),  # valid op, not allowed
        (knock(Operation.RESPONSE), Reason.OPERATION),
        (knock(Operation.COMEIN), Reason.OPERATION),
        (knock(6), Reason.OPERATION),
        (knock(0xFFFFFFFF), Reason.OPERATION),
        (knock(user=0x12345678), Reason.UNKNOWN_USER),
        (knock(key=KEY3), Reason.MAC),
    ]
    cases += [(flip(good, i), Reason.MAC) for i in [*range(12, 16), *range(16, 56)]]
    for data, expected in cases:
        reason, msg = ring.check(data)
        assert (reason, msg) == (expected, None), (data.hex(), reason, expected)
        assert isinstance(reason, Reason)


def test_check_cheapest_first(ring: Any) -> None:
    # bad magic + bad op + unknown user + bad MAC: the magic is reported
    data = datagram(9, 0x12345678, 0, bytes(8), bytes(32))
    assert ring.check(b"\0" + data[1:])[0] == Reason.MAGIC
    assert ring.check(data)[0] == Reason.OPERATION
    assert ring.check(datagram(0, 0x12345678, 0, bytes(8), bytes(32)))[0] == Reason.UNKNOWN_USER


def test_check_allowed_ops(ring: Any) -> None:
    response = knock(Operation.RESPONSE)  # signed over the zero challenge
    assert ring.check(response)[0] == Reason.OPERATION
    assert ring.check(response, 1 << Operation.RESPONSE)[0] == Reason.OK
    assert ring.check(knock(), 0)[0] == Reason.OPERATION
    assert ring.check(knock(), 1 << Operation.REVOKE)[0] == Reason.OPERATION
    assert ring.check(knock(), 0xFFFFFFFF)[0] == Reason.OK
    assert ring.check(knock(6), 0xFFFFFFFF)[0] == Reason.OPERATION


def test_check_allowed_ops_must_be_a_32_bit_int(ring: Any) -> None:
    """Both implementations refuse what is not a 32-bit mask (C used to truncate a float)."""
    for bad, exc in ((1.0, TypeError), (1.9, TypeError), ("1", TypeError), (None, TypeError),
                     (-1, OverflowError), (1 << 32, OverflowError)):  # fmt: skip
        with pytest.raises(exc):
            ring.check(knock(), bad)
    assert ring.check(knock(), 1)[0] == Reason.OK  # control: the int the float stood for


def test_check_wrong_types(ring: Any) -> None:
    with pytest.raises(TypeError):
        ring.check("x" * 56)
    with pytest.raises(TypeError):
        ring.check(None)


def test_keyring_many_users(impl: SimpleNamespace) -> None:
    users = sorted({0, 1, 0xFFFFFFFF, *(i * 0x9E3779B1 & 0xFFFFFFFF for i in range(1, 300))})
    keys = {u: struct.pack(">I", u) * 8 for u in users}
    ring = impl.mac.KeyRing(keys)
    assert len(ring) == len(users)
    for u in users:
        assert u in ring
        assert ring.check(knock(key=keys[u], user=u))[0] == Reason.OK
        other = users[0] if u != users[0] else users[1]
        assert ring.check(knock(key=keys[other], user=u))[0] == Reason.MAC
    for u in (2, 0xFFFFFFFE, users[5] + 1, users[-2] - 1):
        if u not in keys:
            assert ring.check(knock(user=u))[0] == Reason.UNKNOWN_USER


@given(data=st.binary(max_size=120))
def test_check_never_raises(impl: SimpleNamespace, data: bytes) -> None:
    ring = impl.mac.KeyRing({USER1: KEY1})
    reason, msg = ring.check(data)
    assert isinstance(reason, Reason) and reason != Reason.OK and msg is None


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 55), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 55), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 56), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 60), st.just(0)),
    st.tuples(st.just("keep"), st.just(0), st.just(0)),
)


def mutate(data: bytes, how: tuple[str, int, int]) -> bytes:
    kind, a, b = how
    out = bytearray(data)
    if kind in ("flip", "set") and not out:
        return b""
    if kind == "flip":
        out[a % len(out)] ^= 1 << b
    elif kind == "set":
        out[a % len(out)] = b
    elif kind == "cut":
        del out[a:]
    elif kind == "extend":
        out += bytes(a)
    return bytes(out)


@given(
    op=st.sampled_from([*Operation, 6, 0xFFFFFFFF]),
    user=st.sampled_from([USER1, USER3, 0, 0xFFFFFFFF]),
    how=st.lists(mutations, max_size=3),
    allowed=st.sampled_from([0x21, 0, 0x3F, 1 << Operation.RESPONSE, 0xFFFFFFFF]),
)
def test_c_check_matches_py(
    both: tuple[SimpleNamespace, ...],
    op: int,
    user: int,
    how: list[tuple[str, int, int]],
    allowed: int,
) -> None:
    py, c = both
    keys = {USER1: KEY1, USER3: KEY3}
    data = knock(op, keys.get(user, KEY1), user)
    for step in how:
        data = mutate(data, step)
    expected = py.mac.KeyRing(keys).check(data, allowed)
    assert c.mac.KeyRing(keys).check(data, allowed) == expected


@given(data=st.binary(max_size=80), allowed=st.integers(-1, 2**33))
def test_c_check_matches_py_random(
    both: tuple[SimpleNamespace, ...], data: bytes, allowed: int
) -> None:
    py, c = both
    keys = {USER1: KEY1}
    expected = outcome(py.mac.KeyRing(keys).check, data, allowed)
    assert outcome(c.mac.KeyRing(keys).check, data, allowed) == expected
