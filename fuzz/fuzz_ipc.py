#!/usr/bin/env python3
"""Fuzz target "ipc": the fastknockd <-> fastknockfwd codec, ``fastknock.ipc``.

Invariant: for any bytes, ``decode_request`` returns a ``FwRequest`` or raises
``WireError`` and ``decode_reply`` returns an ``FwStatus`` or raises ``WireError``, never
another exception. What decodes re-encodes: ``encode_request(decode_request(x)) == x``,
except that an IPv4-mapped IPv6 address comes back as family 4 (both sides normalise it),
and then decoding that again gives the same request; ``encode_reply(decode_reply(x)) == x``.
A decoded IPv4-mapped address is always plain IPv4. Input: the bytes fastknockfwd would
read from a connection (the reply decoder gets them too).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import atheris
import harness
from harness import Violation

with atheris.instrument_imports():
    from fastknock.errors import WireError
    from fastknock.ipc import (
        FwOp,
        FwRequest,
        FwStatus,
        decode_reply,
        decode_request,
        encode_reply,
        encode_request,
    )


@atheris.instrument_func
def _request(data: bytes) -> None:
    try:
        req = decode_request(data)
    except WireError:
        return
    addr = req.addr
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise Violation("decode_request kept an IPv4-mapped IPv6 address")
    again = encode_request(req)
    mapped = data[6] == 6 and ipaddress.IPv6Address(data[16:32]).ipv4_mapped is not None
    if again != data and not (mapped and again[6] == 4):
        raise Violation("encode_request(decode_request(x)) != x")
    if decode_request(again) != req:
        raise Violation("decode_request(encode_request(r)) != r")


@atheris.instrument_func
def _reply(data: bytes) -> None:
    try:
        status = decode_reply(data)
    except WireError:
        return
    if encode_reply(status) != data:
        raise Violation("encode_reply(decode_reply(x)) != x")


@atheris.instrument_func
def one(data: bytes) -> None:
    _request(data)
    _reply(data)


def seeds() -> Iterator[bytes]:
    """Valid requests (each operation, IPv4, IPv6, IPv4-mapped, extreme ids, addresses and
    deadlines), near-misses of the fixed header (a version-1 size, deadline 0), and every
    reply. Deadlines are explicit, so the seeds do not depend on the clock."""
    addrs = ("127.0.0.1", "192.0.2.7", "0.0.0.0", "255.255.255.255", "::1", "2001:db8::7",
             "ff02::1", "::ffff:198.51.100.9")  # fmt: skip
    for op in FwOp:
        for addr in addrs:
            for user, resource, deadline in ((1, 2, 10_000), (0, 0xFFFFFFFF, 2**64 - 1)):
                ip = ipaddress.ip_address(addr)
                req = encode_request(FwRequest(op, user, resource, ip, bytes(range(32)), deadline))
                yield req
                if ip.version == 6:  # the mapped form as bytes, not as encode writes it
                    yield req[:6] + b"\x06" + req[7:16] + ip.packed + req[32:]
    good = encode_request(FwRequest(FwOp.INSTALL, 1, 2, ipaddress.ip_address("10.0.0.1"),
                                    bytes(32), 1))  # fmt: skip
    for index, value in ((0, 0), (4, 1), (4, 3), (5, 3), (6, 5), (7, 1), (20, 1), (71, 0)):
        yield good[:index] + bytes([value]) + good[index + 1 :]
    yield good[:64]
    yield good + b"\0"
    for status in FwStatus:
        yield encode_reply(status)
    yield encode_reply(FwStatus.ACK)[:7] + b"\x01"


if __name__ == "__main__":
    harness.main("ipc", one, seeds)
