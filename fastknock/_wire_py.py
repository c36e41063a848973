"""Pure-Python reference of the 56-byte wire codec (``fastknock._wire`` is the C version).

Design
------
* Written from PROTOCOL.md with ``struct``, independently of ``_wire.pyx``; the tests run
  every behaviour on both and compare them on random input, so keep the two separate.
* Same API, same exception types: ``WireError`` (a ``ValueError``) for a bad value,
  ``TypeError`` for a wrong type (an int that is not an ``int``, bytes that are not
  bytes-like). Byte fields accept any contiguous buffer; lengths count bytes.
* ``parse`` returns ``Message(Operation, int, int, bytes, bytes)``.
"""

from __future__ import annotations

import struct

from fastknock.errors import WireError
from fastknock.message import AUTH_SIZE, MAGIC, MSG_SIZE, SALT_SIZE, Message, Operation

__all__ = ["pack", "parse", "serialize"]

_FRAME = struct.Struct(">IIII8s32s")
assert _FRAME.size == MSG_SIZE
U32_MAX = 0xFFFFFFFF
_MAX_OP = max(Operation)


def as_bytes(value: object, what: str) -> bytes:
    """``value`` as ``bytes``; ``TypeError`` if it does not support the buffer protocol."""
    if isinstance(value, bytes):
        return value
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}") from None
    if not view.c_contiguous:
        raise BufferError(f"{what} must be a C-contiguous buffer")
    return view.tobytes()


def fixed_bytes(value: object, size: int, what: str) -> bytes:
    """``value`` as ``bytes`` of exactly ``size`` bytes, else ``WireError``."""
    data = as_bytes(value, what)
    if len(data) != size:
        raise WireError(f"{what} must be {size} bytes, got {len(data)}")
    return data


def u32(value: object, what: str) -> int:
    """``value`` checked to be an ``int`` in 0..2**32-1."""
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= U32_MAX:
        raise WireError(f"{what} must be a 32-bit unsigned integer, got {value}")
    return value


def _operation(value: object) -> int:
    op = u32(value, "operation")
    if op > _MAX_OP:
        raise WireError(f"unknown operation {op}")
    return op


def parse(data: bytes | bytearray | memoryview) -> Message:
    """Decode one 56-byte message; ``WireError`` on wrong size, magic or operation."""
    raw = as_bytes(data, "message")
    if len(raw) != MSG_SIZE:
        raise WireError(f"message must be {MSG_SIZE} bytes, got {len(raw)}")
    magic, op, user, resource, salt, auth = _FRAME.unpack(raw)
    if magic != MAGIC:
        raise WireError(f"bad magic 0x{magic:08x}")
    if op > _MAX_OP:
        raise WireError(f"unknown operation {op}")
    return Message(Operation(op), user, resource, salt, auth)


def pack(operation: int, user: int, resource: int, salt: bytes, auth: bytes) -> bytes:
    """Encode one message from its fields."""
    return _FRAME.pack(
        MAGIC,
        _operation(operation),
        u32(user, "user"),
        u32(resource, "resource"),
        fixed_bytes(salt, SALT_SIZE, "salt"),
        fixed_bytes(auth, AUTH_SIZE, "auth"),
    )


def serialize(msg: Message) -> bytes:
    """Encode a ``Message`` (any 5-sequence of its fields)."""
    operation, user, resource, salt, auth = msg
    return pack(operation, user, resource, salt, auth)
