#!/usr/bin/env python3
"""Fuzz target "wire": the 56-byte codec and the fused first-datagram check, C vs Python.

Invariant: for any bytes, ``fastknock._wire`` and ``fastknock._wire_py`` give the same
result of ``parse`` (the same Message, or both ``WireError``), a parsed message serializes
back to the same 56 bytes, and ``KeyRing.check`` of ``fastknock._hmac`` and
``fastknock._hmac_py`` returns the same ``(Reason, Message | None)`` -- never an exception
for bytes-like data and an int mask -- and both raise the same type for a mask that is not
a 32-bit unsigned int. ``HmacKey.digest`` gives the same MAC on both for any key and data.
Nothing else is ever raised.

Input layout: byte 0 = flags, then the datagram (or the key and data of a digest).
  bits 0-1: how the datagram is passed (bytes, bytearray, memoryview, memoryview slice)
  bits 2-3: allowed_ops (default, the next 4 bytes, the next 9 bytes as a signed int, a
            float from the next 8 bytes -- the C and Python checks must agree on each)
  bit 4:    also digest: the next byte is a key length, then the key, then the data
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import atheris
import harness
from harness import Difference, Violation, outcome, same

with atheris.instrument_imports():
    from fastknock import _hmac, _hmac_py, _wire, _wire_py
    from fastknock.errors import WireError
    from fastknock.message import MAGIC, MSG_SIZE, ZERO_CHALLENGE, Operation

# The PROTOCOL.md vector users (32-byte keys), a key longer than the SHA3-256 block (hashed
# first) and an empty key: every key shape the C key setup has a branch for.
KEYS = {
    0xA423DDA7: b"\x9e" * 32,
    0x280D04F3: b"\x6b" * 32,
    0x00000001: bytes(range(200)),
    0xFFFFFFFF: b"",
}
RINGS = (_hmac.KeyRing(KEYS), _hmac_py.KeyRing(KEYS))


@atheris.instrument_func
def _wrap(mode: int, data: bytes) -> object:
    if mode == 1:
        return bytearray(data)
    if mode == 2:
        return memoryview(data)
    if mode == 3:
        return memoryview(b"\0" + data)[1:]
    return data


@atheris.instrument_func
def _allowed_ops(mode: int, rest: bytes) -> tuple[object, bytes]:
    if mode == 1:
        return int.from_bytes(rest[:4], "big"), rest[4:]
    if mode == 2:
        return int.from_bytes(rest[:9], "big", signed=True), rest[9:]
    if mode == 3:
        raw = rest[:8].ljust(8, b"\0")
        return struct.unpack(">d", raw)[0], rest[8:]
    return _hmac_py.DEFAULT_ALLOWED_OPS, rest


@atheris.instrument_func
def _codec(data: object) -> None:
    c = outcome(_wire.parse, data)
    py = outcome(_wire_py.parse, data)
    same("parse", c, py)
    if py[0] == "raise":
        if py[1] is not WireError:
            raise Difference("parse raised a non-WireError", repr(py[1]))
        return
    msg = py[1]
    same("parse field types", [type(f) for f in c[1]], [type(f) for f in msg])
    raw = bytes(data)  # type: ignore[call-overload]
    for name, codec in (("C", _wire), ("Python", _wire_py)):
        if codec.serialize(msg) != raw or codec.pack(*msg) != raw:
            raise Violation(f"{name} serialize(parse(x)) != x")


@atheris.instrument_func
def _check(data: object, ops: object) -> None:
    c = outcome(RINGS[0].check, data, ops)
    py = outcome(RINGS[1].check, data, ops)
    same("check", c, py)
    if isinstance(ops, int) and 0 <= ops <= 0xFFFFFFFF and py[0] == "raise":
        raise Violation("check raised for bytes-like data", repr(py[1]))
    if py[0] == "ok" and py[1][1] is not None:
        parsed = _wire_py.parse(data)  # type: ignore[arg-type]
        if parsed != py[1][1]:
            raise Violation("check's message != parse's message")


@atheris.instrument_func
def _digest(rest: bytes) -> None:
    size = rest[0] if rest else 0
    key, data = rest[1 : 1 + size], rest[1 + size :]
    same("digest", _hmac.HmacKey(key).digest(data), _hmac_py.HmacKey(key).digest(data))


@atheris.instrument_func
def one(data: bytes) -> None:
    flags = data[0] if data else 0
    rest = data[1:]
    if flags & 0x10:
        _digest(rest)
        return
    ops, rest = _allowed_ops((flags >> 2) & 3, rest)
    wrapped = _wrap(flags & 3, rest)
    _codec(wrapped)
    _check(wrapped, ops)
    if len(rest) == MSG_SIZE and isinstance(ops, int) and 0 <= ops <= 0xFFFFFFFF:
        # The same datagram as its own buffer type must give the same answer.
        same("check over buffer types", RINGS[0].check(rest, ops), RINGS[0].check(wrapped, ops))


# PROTOCOL.md "Test vectors": (key, operation, user, resource, salt, challenge, AUTH).
VECTORS = (
    (b"\x9e" * 32, Operation.KNOCK, 0xA423DDA7, 0xBC5D8077, b"\x4a" * 8, ZERO_CHALLENGE,
     "6399e5e0ff16219a5ebf6299c41dca189a2f7619bd0ab2ea5f81b8aef9fe0600"),
    (b"\x9e" * 32, Operation.REVOKE, 0xA423DDA7, 0xBC5D8077, b"\x4a" * 8, ZERO_CHALLENGE,
     "b4bb7a905b52ef9d7eddbb030a7f7bd75d565a880ff3cb83a54e64a676828ef8"),
    (b"\x6b" * 32, Operation.RESPONSE, 0x280D04F3, 0xE2EE7397, b"\x62" * 8, b"\xb8" * 32,
     "ac41973381d5934958ac028899fb90a130bc94eb6e8c54808d21931debb9ca2a"),
)  # fmt: skip


def seeds() -> Iterator[bytes]:
    """The vectors' datagrams under every flag combination, a KNOCK of each ring user,
    datagrams of each operation, near-misses (size, magic), and digests at the SHA3-256
    block boundaries."""
    datagrams = []
    for key, op, user, resource, salt, challenge, auth in VECTORS:
        assert _hmac_py.HmacKey(key).sign(op, user, resource, salt, challenge).hex() == auth
        datagrams.append(_wire_py.pack(op, user, resource, salt, bytes.fromhex(auth)))
    for user, key in KEYS.items():
        for op in Operation:
            sig = _hmac_py.HmacKey(key).sign(op, user, 7, b"saltsalt")
            datagrams.append(_wire_py.pack(op, user, 7, b"saltsalt", sig))
    good = datagrams[0]
    datagrams += [good[:55], good + b"\0", b"", struct.pack(">I", MAGIC ^ 1) + good[4:]]
    datagrams.append(good[:4] + struct.pack(">I", 6) + good[8:])
    for flags in range(16):
        mode = (flags >> 2) & 3
        ops = (b"", (0x3F).to_bytes(4, "big"), (-1).to_bytes(9, "big", signed=True),
               struct.pack(">d", 33.5))[mode]  # fmt: skip
        for datagram in datagrams if flags in (0, 4) else datagrams[:3]:
            yield bytes([flags]) + ops + datagram
    for key_size in (0, 32, 135, 136, 137, 255):
        for data_size in (0, 52, 135, 136, 137, 300):
            yield bytes([0x10, key_size]) + bytes(range(key_size)) + b"d" * data_size


if __name__ == "__main__":
    harness.main("wire", one, seeds)
