"""Micro-benchmarks of the per-datagram hot path, all on the same valid 56-byte KNOCK.

* baseline: ``hmac.digest(key, msg52, "sha3_256")`` + ``hmac.compare_digest`` -- what a
  straightforward server does (msg52 = OPERATION || USER || RESOURCE || SALT || zeros).
* c_keyring_check: the fused C parse-and-verify ``KeyRing.check(datagram)``, which also
  builds the returned Message.
* c_hmackey_verify: C ``HmacKey.verify`` on the already-parsed fields.
* py_keyring_check: the pure-Python reference ``KeyRing.check``.
* c_keyring_check_bad_mac: the C check of a datagram whose AUTH is wrong (full MAC
  cost, no objects built).

The session summary (bench/conftest.py) prints baseline_mean / mean for each.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import Any

import pytest

from fastknock import _ext, _hmac_py
from fastknock.message import MAGIC, ZERO_CHALLENGE, Operation, Reason

NO_EXTENSIONS = _ext.disabled()
needs_c = pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")

KEY = bytes.fromhex("9e" * 32)
USER, RESOURCE, SALT = 0xA423DDA7, 0xBC5D8077, b"\x4a" * 8
MSG52 = struct.pack(">III", Operation.KNOCK, USER, RESOURCE) + SALT + ZERO_CHALLENGE
AUTH = hmac.digest(KEY, MSG52, "sha3_256")
DATAGRAM = struct.pack(">IIII", MAGIC, Operation.KNOCK, USER, RESOURCE) + SALT + AUTH
BAD_DATAGRAM = DATAGRAM[:-1] + bytes([DATAGRAM[-1] ^ 1])
# a few more users so the lookup is not trivial
KEYS = {USER: KEY, **{i * 0x01010101: bytes([i]) * 32 for i in range(1, 8)}}


def baseline(key: bytes, msg52: bytes, auth: bytes) -> bool:
    return hmac.compare_digest(hmac.digest(key, msg52, "sha3_256"), auth)


def test_baseline(measure: Callable[..., Any]) -> None:
    assert measure("baseline", baseline, KEY, MSG52, AUTH) is True


@needs_c
def test_c_keyring_check(measure: Callable[..., Any]) -> None:
    from fastknock import _hmac

    reason, msg = measure("c_keyring_check", _hmac.KeyRing(KEYS).check, DATAGRAM)
    assert reason == Reason.OK and msg is not None and msg.auth == AUTH


@needs_c
def test_c_keyring_check_bad_mac(measure: Callable[..., Any]) -> None:
    from fastknock import _hmac

    result = measure("c_keyring_check_bad_mac", _hmac.KeyRing(KEYS).check, BAD_DATAGRAM)
    assert result == (Reason.MAC, None)


@needs_c
def test_c_hmackey_verify(measure: Callable[..., Any]) -> None:
    from fastknock import _hmac

    verify = _hmac.HmacKey(KEY).verify
    args = (Operation.KNOCK, USER, RESOURCE, SALT, AUTH)
    assert measure("c_hmackey_verify", verify, *args) is True


def test_py_keyring_check(measure: Callable[..., Any]) -> None:
    reason, msg = measure("py_keyring_check", _hmac_py.KeyRing(KEYS).check, DATAGRAM)
    assert reason == Reason.OK and msg is not None
