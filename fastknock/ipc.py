"""IPC between fastknockd (unprivileged) and fastknockfwd (root): the codec and the paths.

Design
------
One request per Unix stream connection, one reply, then both sides close. Fixed sizes, so
the daemon reads exactly ``REQUEST_SIZE`` bytes or drops the peer; no framing state.

Request (72 bytes, big-endian)::

    offset size field
    0      4    MAGIC = b"FKFW"
    4      1    VERSION = 2
    5      1    OP (1 install, 2 revoke)
    6      1    FAMILY (4 or 6)
    7      1    reserved, must be 0
    8      4    USER (u32)
    12     4    RESOURCE (u32)
    16     16   ADDRESS (IPv4: 4 bytes, then 12 zero bytes; IPv6: 16 bytes)
    32     32   CHECKSUM of the config file the sender runs with
    64     8    DEADLINE (u64): CLOCK_MONOTONIC milliseconds after which the sender no longer
                waits for the answer (both daemons run on one host: one monotonic clock)

Reply (8 bytes): MAGIC(4) VERSION(1) STATUS(1) reserved(2, zero).

Deadline: fastknockd gives up on a request after its control timeout and tells the client
"failed"; fastknockfwd must then never apply it (a stalled fwd used to apply every queued
request once it resumed: leases for clients told GOAWAY). The sender sets DEADLINE a
margin before its own give-up (``deadline_after``), so a change fwd starts before DEADLINE
is done before the sender stops waiting; fwd answers EXPIRED for a request whose deadline
passed, checked when it arrives and again just before its batch is applied. Version 1
(64 bytes, no deadline) is refused: both daemons are upgraded together.

The daemon checks that CHECKSUM equals the checksum of its own config, so both processes
agree on what a user/resource id means. IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``)
are IPv4 clients: ``encode_request`` and ``decode_request`` both normalise them, so the
firewall only ever sees plain IPv4 for them.

This module is stdlib-only and imported by the root daemon: keep it small. The client is
``fastknock.knockd.fwdlink`` (fastknockd only); the tests have a blocking one.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import time
from dataclasses import dataclass

from fastknock.addr import IPAddress, normalize
from fastknock.errors import WireError

MAGIC = b"FKFW"
VERSION = 2
CHECKSUM_SIZE = 32
_REQ = struct.Struct(">4sBBBBII16s32sQ")
_REP = struct.Struct(">4sBBH")
REQUEST_SIZE = _REQ.size  # 72
REPLY_SIZE = _REP.size  # 8
DEFAULT_TTL = 10.0  # seconds: the deadline of a request whose sender named none
# Room for fwd's transaction between its last deadline check and the sender's give-up.
DEADLINE_MARGIN = 0.25

SOCKET_DIR = "fastknockfwd"
SOCKET_NAME = "fastknockfwd.sock"
PID_NAME = "fastknockfwd.pid"


class FwOp(enum.IntEnum):
    INSTALL = 1
    REVOKE = 2


class FwStatus(enum.IntEnum):
    """The daemon's answer. ACK is success; everything else is a NACK with its reason."""

    ACK = 0
    MALFORMED = 1  # the request bytes were not a valid request
    BAD_CHECKSUM = 2  # the sender runs with a different config file
    BAD_ADDRESS = 3  # all-zero/all-ones address, or a family the nftables family lacks
    UNKNOWN_RESOURCE = 4
    USER_NOT_ALLOWED = 5  # unknown user, or not in the resource's users: list
    BAD_PORT = 6  # port 0 or the control port
    LIMIT = 7  # [NFTABLES] max-nr-rules reached
    FIREWALL_ERROR = 8  # nftables refused the change
    NOT_PERMITTED = 9  # the peer's uid/gid is not the server account's
    EXPIRED = 10  # the request's deadline passed before it could be applied


@dataclass(frozen=True, slots=True)
class FwRequest:
    op: FwOp
    user: int
    resource: int
    addr: IPAddress
    checksum: bytes
    deadline_ms: int | None = None  # now_ms() clock; None: DEFAULT_TTL from encoding


def now_ms() -> int:
    """CLOCK_MONOTONIC in milliseconds: the clock of DEADLINE."""
    return time.monotonic_ns() // 1_000_000


def deadline_after(timeout: float) -> int:
    """DEADLINE for a sender that waits ``timeout`` seconds: a margin earlier (at most a
    quarter of the timeout), so the answer to a change begun in time arrives in time."""
    margin = min(DEADLINE_MARGIN, timeout / 4)
    return now_ms() + max(int((timeout - margin) * 1000), 0)


def socket_path(rundir: str = "/run") -> str:
    return f"{rundir.rstrip('/') or ''}/{SOCKET_DIR}/{SOCKET_NAME}"


def pid_path(rundir: str = "/run") -> str:
    return f"{rundir.rstrip('/') or ''}/{SOCKET_DIR}/{PID_NAME}"


def encode_request(req: FwRequest) -> bytes:
    """Serialise ``req``; raises WireError for out-of-range fields."""
    try:
        op = FwOp(req.op)
    except ValueError:
        raise WireError(f"bad firewall operation {req.op!r}") from None
    if not 0 <= req.user <= 0xFFFFFFFF or not 0 <= req.resource <= 0xFFFFFFFF:
        raise WireError("user/resource id out of range")
    if not isinstance(req.checksum, bytes) or len(req.checksum) != CHECKSUM_SIZE:
        raise WireError(f"config checksum must be {CHECKSUM_SIZE} bytes")
    if not isinstance(req.addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise WireError(f"not an IP address: {req.addr!r}")
    deadline = deadline_after(DEFAULT_TTL) if req.deadline_ms is None else req.deadline_ms
    if not isinstance(deadline, int) or not 0 < deadline <= 0xFFFFFFFFFFFFFFFF:
        raise WireError("deadline out of range")
    addr = normalize(req.addr)
    if isinstance(addr, ipaddress.IPv4Address):
        family, packed = 4, addr.packed + bytes(12)
    else:
        family, packed = 6, addr.packed
    return _REQ.pack(
        MAGIC, VERSION, op, family, 0, req.user, req.resource, packed, req.checksum, deadline
    )


def decode_request(data: bytes) -> FwRequest:
    """Parse one request; raises WireError on anything malformed."""
    if len(data) != REQUEST_SIZE:
        raise WireError(f"request must be {REQUEST_SIZE} bytes, got {len(data)}")
    magic, version, op, family, reserved, user, resource, packed, checksum, deadline = _REQ.unpack(
        data
    )
    if magic != MAGIC:
        raise WireError("bad request magic")
    if version != VERSION:
        raise WireError(f"unsupported request version {version}")
    if op not in (FwOp.INSTALL, FwOp.REVOKE):
        raise WireError(f"bad firewall operation {op}")
    if reserved != 0:
        raise WireError("reserved request byte is not zero")
    if deadline == 0:
        raise WireError("request without a deadline")
    addr: IPAddress
    if family == 4:
        if any(packed[4:]):
            raise WireError("IPv4 address padding is not zero")
        addr = ipaddress.IPv4Address(packed[:4])
    elif family == 6:
        addr = normalize(ipaddress.IPv6Address(packed))
    else:
        raise WireError(f"bad address family {family}")
    return FwRequest(FwOp(op), user, resource, addr, checksum, deadline)


def encode_reply(status: FwStatus) -> bytes:
    return _REP.pack(MAGIC, VERSION, FwStatus(status), 0)


def decode_reply(data: bytes) -> FwStatus:
    if len(data) != REPLY_SIZE:
        raise WireError(f"reply must be {REPLY_SIZE} bytes, got {len(data)}")
    magic, version, status, reserved = _REP.unpack(data)
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise WireError("bad reply header")
    try:
        return FwStatus(status)
    except ValueError:
        raise WireError(f"unknown reply status {status}") from None
