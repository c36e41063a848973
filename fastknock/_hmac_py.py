"""Pure-Python reference of HMAC-SHA3-256 keys and the key ring (C version: ``_hmac``).

Design
------
* RFC 2104 over hashlib's SHA3-256, written independently of ``_hmac.pyx``: the key
  (hashed first if longer than the 136-byte SHA3-256 block) is zero-padded, XORed with
  ipad/opad, and absorbed once into two hashlib objects; each MAC is then two ``.copy()``
  plus one update each. Same results as ``hmac.digest(key, data, "sha3_256")``.
* AUTH = HMAC(KEY)(OPERATION || USER || RESOURCE || SALT || CHALLENGE) per PROTOCOL.md,
  with 4-byte big-endian integers. Verification uses ``hmac.compare_digest``.
* ``KeyRing.check`` is the fused parse-and-verify of a session's first datagram. It
  rejects cheapest first (size, magic, operation, user, MAC), returns
  ``(Reason, Message | None)`` and never raises for any bytes (peer input).
* Keys are never stored as such, never in ``repr``; these objects refuse to be pickled.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from typing import NoReturn

from fastknock._wire_py import as_bytes, fixed_bytes, u32
from fastknock.message import (
    AUTH_SIZE,
    MAGIC,
    MSG_SIZE,
    SALT_SIZE,
    ZERO_CHALLENGE,
    Message,
    Operation,
    Reason,
)

__all__ = ["DEFAULT_ALLOWED_OPS", "HmacKey", "KeyRing", "vector_macs"]

BLOCK_SIZE = 136  # SHA3-256 rate in bytes
DEFAULT_ALLOWED_OPS = (1 << Operation.KNOCK) | (1 << Operation.REVOKE)

_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_AUTH_HEAD = struct.Struct(">III")
_DATAGRAM = struct.Struct(">IIII8s32s")


def _not_picklable(obj: object) -> NoReturn:
    raise TypeError(f"{type(obj).__name__} holds a secret key and cannot be pickled")


class HmacKey:
    """HMAC-SHA3-256 with a pre-absorbed key."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        raw = as_bytes(key, "key")
        if len(raw) > BLOCK_SIZE:
            raw = hashlib.sha3_256(raw).digest()
        raw = raw.ljust(BLOCK_SIZE, b"\0")
        self._inner = hashlib.sha3_256(raw.translate(_IPAD))
        self._outer = hashlib.sha3_256(raw.translate(_OPAD))

    def digest(self, data: bytes) -> bytes:
        """HMAC of ``data`` (any length)."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(
        self,
        operation: int,
        user: int,
        resource: int,
        salt: bytes,
        challenge: bytes = ZERO_CHALLENGE,
    ) -> bytes:
        """The AUTH field for these message fields and challenge token."""
        head = _AUTH_HEAD.pack(
            u32(operation, "operation"), u32(user, "user"), u32(resource, "resource")
        )
        salt = fixed_bytes(salt, SALT_SIZE, "salt")
        challenge = fixed_bytes(challenge, AUTH_SIZE, "challenge")
        return self.digest(head + salt + challenge)

    def verify(
        self,
        operation: int,
        user: int,
        resource: int,
        salt: bytes,
        auth: bytes,
        challenge: bytes = ZERO_CHALLENGE,
    ) -> bool:
        """Constant-time check of ``auth``; an ``auth`` of the wrong length is False."""
        expected = self.sign(operation, user, resource, salt, challenge)
        received = as_bytes(auth, "auth")
        # compare_digest is constant-time for equal lengths; a wrong length is public.
        return hmac.compare_digest(expected, received)

    def verify_message(self, msg: Message, challenge: bytes = ZERO_CHALLENGE) -> bool:
        operation, user, resource, salt, auth = msg
        return self.verify(operation, user, resource, salt, auth, challenge)

    def __repr__(self) -> str:
        return "HmacKey(<redacted>)"

    def __reduce__(self) -> NoReturn:
        _not_picklable(self)


class KeyRing:
    """One ``HmacKey`` per user id, and the fused first-datagram check."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        self._keys: dict[int, HmacKey] = {}
        for user, key in keys.items():
            self._keys[u32(user, "user id")] = HmacKey(key)

    def get(self, user: int) -> HmacKey | None:
        if not isinstance(user, int):
            return None
        return self._keys.get(user)

    def __contains__(self, user: object) -> bool:
        return isinstance(user, int) and user in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def check(
        self, data: bytes | bytearray | memoryview, allowed_ops: int = DEFAULT_ALLOWED_OPS
    ) -> tuple[int, Message | None]:
        """Parse and authenticate (zero challenge) the first datagram of a session."""
        allowed_ops = _ops_mask(allowed_ops)
        raw = as_bytes(data, "datagram")
        if len(raw) != MSG_SIZE:
            return Reason.SIZE, None
        magic, op, user, resource, salt, auth = _DATAGRAM.unpack(raw)
        if magic != MAGIC:
            return Reason.MAGIC, None
        if op > Operation.REVOKE or not (allowed_ops >> op) & 1:
            return Reason.OPERATION, None
        key = self._keys.get(user)
        if key is None:
            return Reason.UNKNOWN_USER, None
        if not key.verify(op, user, resource, salt, auth):
            return Reason.MAC, None
        return Reason.OK, Message(Operation(op), user, resource, salt, auth)

    def check_batch(
        self,
        datagrams: Iterable[bytes | bytearray | memoryview],
        allowed_ops: int = DEFAULT_ALLOWED_OPS,
    ) -> list[int]:
        """The reason ``check`` gives each datagram (the C version verifies the MACs four at
        a time, as its batched receive path does)."""
        return [self.check(d, allowed_ops)[0] for d in datagrams]

    def __repr__(self) -> str:
        return f"KeyRing(<{len(self._keys)} keys redacted>)"

    def __reduce__(self) -> NoReturn:
        _not_picklable(self)


def vector_macs(enabled: bool | None = None) -> bool:
    """Whether batches of MACs are computed four at a time with AVX2: never here (the C
    version's switch; see ``fastknock._hmac``)."""
    return False


def _ops_mask(allowed_ops: object) -> int:
    """``allowed_ops`` must be a 32-bit mask (the C version stores an unsigned int)."""
    if not isinstance(allowed_ops, int):
        raise TypeError(f"allowed_ops must be an int, not {type(allowed_ops).__name__}")
    if not 0 <= allowed_ops <= 0xFFFFFFFF:
        raise OverflowError(f"allowed_ops must fit in 32 bits, got {allowed_ops}")
    return allowed_ops
