"""The 56-byte wire codec (PROTOCOL.md "Message"), on both implementations.

Invariant for the differential tests: for any input, the C codec and the pure-Python
reference give the same Message or raise the same exception type.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastknock.errors import WireError
from fastknock.message import MAGIC, MSG_SIZE, Message, Operation

# MAGIC, REVOKE, USER, RESOURCE, SALT, AUTH laid out by hand from the PROTOCOL.md table.
REVOKE_HEX = (
    "3b1bb719" "00000005" "a423dda7" "bc5d8077" "4a4a4a4a4a4a4a4a"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
)  # fmt: skip
REVOKE_BYTES = bytes.fromhex(REVOKE_HEX)
REVOKE_MSG = Message(Operation.REVOKE, 0xA423DDA7, 0xBC5D8077, b"\x4a" * 8, bytes(range(32)))

u32s = st.integers(min_value=0, max_value=0xFFFFFFFF)
messages = st.builds(
    Message,
    st.sampled_from(list(Operation)),
    u32s,
    u32s,
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=32, max_size=32),
)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("raise", exception type), for differential comparisons."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the type is what is compared
        return "raise", type(exc)


# --- parse --------------------------------------------------------------------------


def test_parse_known_message(impl: SimpleNamespace) -> None:
    msg = impl.wire.parse(REVOKE_BYTES)
    assert msg == REVOKE_MSG
    assert type(msg) is Message
    assert type(msg.operation) is Operation
    assert msg.operation is Operation.REVOKE
    assert type(msg.salt) is bytes and type(msg.auth) is bytes


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_parse_accepts_buffers(impl: SimpleNamespace, wrap: Any) -> None:
    assert impl.wire.parse(wrap(REVOKE_BYTES)) == REVOKE_MSG


@pytest.mark.parametrize("op", list(Operation))
def test_parse_every_operation(impl: SimpleNamespace, op: Operation) -> None:
    data = REVOKE_BYTES[:4] + struct.pack(">I", op) + REVOKE_BYTES[8:]
    assert impl.wire.parse(data).operation is op


@pytest.mark.parametrize("size", [*range(MSG_SIZE), 57, 112])
def test_parse_rejects_size(impl: SimpleNamespace, size: int) -> None:
    data = (REVOKE_BYTES * 3)[:size]
    with pytest.raises(WireError, match="56 bytes"):
        impl.wire.parse(data)


@pytest.mark.parametrize("index", range(4))
def test_parse_rejects_magic(impl: SimpleNamespace, index: int) -> None:
    data = bytearray(REVOKE_BYTES)
    data[index] ^= 0x01
    with pytest.raises(WireError, match="magic"):
        impl.wire.parse(bytes(data))


@pytest.mark.parametrize("op", [6, 7, 0x100, 0x01000000, 0xFFFFFFFF])
def test_parse_rejects_operation(impl: SimpleNamespace, op: int) -> None:
    data = REVOKE_BYTES[:4] + struct.pack(">I", op) + REVOKE_BYTES[8:]
    with pytest.raises(WireError, match="operation"):
        impl.wire.parse(data)


def test_wire_error_is_value_error(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError):
        impl.wire.parse(b"")


@pytest.mark.parametrize("bad", ["x" * 56, 56, None, [0] * 56])
def test_parse_rejects_non_buffers(impl: SimpleNamespace, bad: object) -> None:
    with pytest.raises(TypeError):
        impl.wire.parse(bad)


# --- pack / serialize ---------------------------------------------------------------


def test_serialize_known_message(impl: SimpleNamespace) -> None:
    assert impl.wire.serialize(REVOKE_MSG) == REVOKE_BYTES
    assert impl.wire.pack(*REVOKE_MSG) == REVOKE_BYTES
    salt, auth = bytearray(b"J" * 8), memoryview(bytes(range(32)))
    assert impl.wire.pack(5, 0xA423DDA7, 0xBC5D8077, salt, auth) == REVOKE_BYTES


def test_pack_extreme_ids(impl: SimpleNamespace) -> None:
    data = impl.wire.pack(Operation.KNOCK, 0, 0xFFFFFFFF, bytes(8), bytes(32))
    assert struct.unpack(">IIII", data[:16]) == (MAGIC, 0, 0, 0xFFFFFFFF)


@pytest.mark.parametrize("op", [6, 7, 0xFFFFFFFF, -1, 2**32])
def test_pack_rejects_operation(impl: SimpleNamespace, op: int) -> None:
    with pytest.raises(WireError):
        impl.wire.pack(op, 1, 2, bytes(8), bytes(32))


@pytest.mark.parametrize("value", [-1, 2**32, 2**64, -(2**63)])
@pytest.mark.parametrize("field", ["user", "resource"])
def test_pack_rejects_out_of_range_ids(impl: SimpleNamespace, field: str, value: int) -> None:
    fields: dict[str, Any] = {
        "operation": 0,
        "user": 1,
        "resource": 2,
        "salt": bytes(8),
        "auth": bytes(32),
    }
    fields[field] = value
    with pytest.raises(WireError, match=field):
        impl.wire.pack(**fields)
    with pytest.raises(WireError, match=field):
        impl.wire.serialize(Message(**fields))


@pytest.mark.parametrize("size", [0, 7, 9, 32])
def test_pack_rejects_salt_length(impl: SimpleNamespace, size: int) -> None:
    with pytest.raises(WireError, match="salt"):
        impl.wire.pack(0, 1, 2, bytes(size), bytes(32))


@pytest.mark.parametrize("size", [0, 8, 31, 33, 56])
def test_pack_rejects_auth_length(impl: SimpleNamespace, size: int) -> None:
    with pytest.raises(WireError, match="auth"):
        impl.wire.pack(0, 1, 2, bytes(8), bytes(size))


@pytest.mark.parametrize(
    "fields",
    [
        (0.0, 1, 2, bytes(8), bytes(32)),
        (0, "1", 2, bytes(8), bytes(32)),
        (0, 1, None, bytes(8), bytes(32)),
        (0, 1, 2, "x" * 8, bytes(32)),
        (0, 1, 2, bytes(8), None),
    ],
)
def test_pack_rejects_wrong_types(impl: SimpleNamespace, fields: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        impl.wire.pack(*fields)


# --- properties ---------------------------------------------------------------------


@given(msg=messages)
def test_round_trip(impl: SimpleNamespace, msg: Message) -> None:
    data = impl.wire.serialize(msg)
    assert len(data) == MSG_SIZE
    assert impl.wire.parse(data) == msg
    assert impl.wire.pack(*msg) == data


@given(op=st.sampled_from(list(Operation)), rest=st.binary(min_size=48, max_size=48))
def test_valid_bytes_round_trip(impl: SimpleNamespace, op: int, rest: bytes) -> None:
    data = struct.pack(">II", MAGIC, op) + rest
    assert impl.wire.serialize(impl.wire.parse(data)) == data


@given(data=st.binary(max_size=120))
def test_c_matches_py_on_random_bytes(both: tuple[SimpleNamespace, ...], data: bytes) -> None:
    py, c = both
    assert outcome(c.wire.parse, data) == outcome(py.wire.parse, data)


@given(op=st.integers(0, 12) | u32s, rest=st.binary(min_size=48, max_size=48))
def test_c_matches_py_on_framed_bytes(
    both: tuple[SimpleNamespace, ...], op: int, rest: bytes
) -> None:
    py, c = both
    data = struct.pack(">II", MAGIC, op) + rest
    assert outcome(c.wire.parse, data) == outcome(py.wire.parse, data)


@given(
    op=st.integers(-2, 8) | st.integers(),
    user=st.integers(-2, 2**32 + 1) | st.integers(),
    salt=st.binary(max_size=10),
    auth=st.binary(min_size=30, max_size=34),
)
def test_c_matches_py_on_pack(
    both: tuple[SimpleNamespace, ...], op: int, user: int, salt: bytes, auth: bytes
) -> None:
    py, c = both
    args = (op, user, 7, salt, auth)
    assert outcome(c.wire.pack, *args) == outcome(py.wire.pack, *args)
