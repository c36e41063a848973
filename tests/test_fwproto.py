"""The fastknockd <-> fastknockfwd IPC codec and its clients.

Invariant: any byte string given to decode_request/decode_reply yields a valid value or a
WireError, never another exception; encode/decode round-trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
import struct
import tempfile
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastknock import addr, ipc
from fastknock.errors import FirewallError, WireError
from fastknock.ipc import FwOp, FwRequest, FwStatus
from fastknock.knockd import fwdlink
from tests import fwd_client

CHECKSUM = bytes(range(32))

addrs = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
)
requests = st.builds(
    FwRequest,
    op=st.sampled_from(FwOp),
    user=st.integers(0, 2**32 - 1),
    resource=st.integers(0, 2**32 - 1),
    addr=addrs,
    checksum=st.binary(min_size=32, max_size=32),
    deadline_ms=st.none() | st.integers(1, 2**64 - 1),
)


def good(addr: str = "192.0.2.7", op: FwOp = FwOp.INSTALL) -> FwRequest:
    return FwRequest(op, 0x12345678, 0x87654321, ipaddress.ip_address(addr), CHECKSUM)


def test_sizes_and_layout() -> None:
    assert ipc.REQUEST_SIZE == 72
    assert ipc.REPLY_SIZE == 8
    data = ipc.encode_request(dataclasses.replace(good(), deadline_ms=0x0102030405060708))
    assert data[:4] == b"FKFW" and data[4] == 2 and data[5] == 1 and data[6] == 4
    assert data[8:12] == bytes.fromhex("12345678")
    assert data[12:16] == bytes.fromhex("87654321")
    assert data[16:20] == bytes([192, 0, 2, 7]) and data[20:32] == bytes(12)
    assert data[32:64] == CHECKSUM
    assert data[64:] == bytes.fromhex("0102030405060708")  # the deadline


def test_deadline_defaults_and_bounds() -> None:
    """No deadline given: now + DEFAULT_TTL; a zero or out-of-range one is refused."""
    before = ipc.now_ms()
    got = ipc.decode_request(ipc.encode_request(good())).deadline_ms
    assert got is not None and before < got <= ipc.now_ms() + int(ipc.DEFAULT_TTL * 1000)
    for bad in (0, -1, 1 << 64):
        with pytest.raises(WireError):
            ipc.encode_request(dataclasses.replace(good(), deadline_ms=bad))
    assert ipc.deadline_after(2.0) <= ipc.now_ms() + 2000 - 250  # a margin before give-up


@given(requests)
def test_request_round_trip(req: FwRequest) -> None:
    back = ipc.decode_request(ipc.encode_request(req))
    assert back.op == req.op and back.user == req.user and back.resource == req.resource
    assert req.deadline_ms is None or back.deadline_ms == req.deadline_ms
    assert back.checksum == req.checksum
    assert back.addr == addr.normalize(req.addr)


@given(st.sampled_from(FwStatus))
def test_reply_round_trip(status: FwStatus) -> None:
    assert ipc.decode_reply(ipc.encode_reply(status)) is status


def test_ipv4_mapped_is_normalised() -> None:
    req = good("::ffff:198.51.100.9")
    data = ipc.encode_request(req)
    assert data[6] == 4
    assert ipc.decode_request(data).addr == ipaddress.IPv4Address("198.51.100.9")
    # Also when a sender puts the mapped form on the wire as family 6.
    raw = bytearray(data)
    raw[6] = 6
    raw[16:32] = ipaddress.IPv6Address("::ffff:198.51.100.9").packed
    assert ipc.decode_request(bytes(raw)).addr == ipaddress.IPv4Address("198.51.100.9")


def _mutate(offset: int, value: int) -> bytes:
    raw = bytearray(ipc.encode_request(good()))
    raw[offset] = value
    return bytes(raw)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        ipc.encode_request(good())[:-1],
        ipc.encode_request(good()) + b"\0",
        _mutate(0, ord("X")),  # magic
        _mutate(4, 1),  # version 1 (no deadline): refused
        _mutate(4, 3),  # version
        _mutate(5, 0),  # op
        _mutate(5, 3),  # op
        _mutate(6, 5),  # family
        _mutate(7, 1),  # reserved
        _mutate(25, 1),  # IPv4 padding
        ipc.encode_request(good())[:64] + bytes(8),  # deadline 0
    ],
)
def test_malformed_requests_rejected(data: bytes) -> None:
    with pytest.raises(WireError):
        ipc.decode_request(data)


@given(st.binary(max_size=80))
def test_decode_request_total(data: bytes) -> None:
    try:
        req = ipc.decode_request(data)
    except WireError:
        return
    assert ipc.decode_request(ipc.encode_request(req)) == req


@given(st.binary(max_size=12))
def test_decode_reply_total(data: bytes) -> None:
    try:
        ipc.decode_reply(data)
    except WireError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"FKFW\x01\x00\x00",
        b"FKFW\x01\x00\x00\x00\x00",
        b"XKFW\x01\x00\x00\x00",
        b"FKFW\x01\x00\x00\x00",  # version 1
        b"FKFW\x03\x00\x00\x00",
        b"FKFW\x01\xff\x00\x00",
        b"FKFW\x01\x00\x00\x01",
    ],
)
def test_malformed_replies_rejected(data: bytes) -> None:
    with pytest.raises(WireError):
        ipc.decode_reply(data)


@pytest.mark.parametrize(
    "req",
    [
        FwRequest(FwOp.INSTALL, 1, 1, ipaddress.IPv4Address("192.0.2.1"), b"short"),
        FwRequest(FwOp.INSTALL, 2**32, 1, ipaddress.IPv4Address("192.0.2.1"), CHECKSUM),
        FwRequest(FwOp.INSTALL, 1, -1, ipaddress.IPv4Address("192.0.2.1"), CHECKSUM),
        FwRequest(7, 1, 1, ipaddress.IPv4Address("192.0.2.1"), CHECKSUM),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_bad_fields(req: FwRequest) -> None:
    with pytest.raises(WireError):
        ipc.encode_request(req)


def test_socket_path() -> None:
    assert ipc.socket_path() == "/run/fastknockfwd/fastknockfwd.sock"
    assert ipc.socket_path("/tmp/x/") == "/tmp/x/fastknockfwd/fastknockfwd.sock"


# --- the clients against a scripted fake daemon -------------------------------------------


class FakeDaemon:
    """A Unix socket server answering every connection with ``reply`` (or nothing)."""

    def __init__(self, reply: bytes | None) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "s.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.reply = reply
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while len(data) < ipc.REQUEST_SIZE:
                    chunk = conn.recv(128)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                if self.reply is None:
                    conn.recv(1)  # hold the connection until the client gives up
                else:
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def fake() -> object:
    daemons: list[FakeDaemon] = []

    def make(reply: bytes | None) -> FakeDaemon:
        daemons.append(FakeDaemon(reply))
        return daemons[-1]

    yield make
    for d in daemons:
        d.close()


def test_clients_get_status(fake) -> None:  # type: ignore[no-untyped-def]
    d = fake(ipc.encode_reply(FwStatus.LIMIT))
    assert fwd_client.request_sync(d.path, good(), 2.0) is FwStatus.LIMIT
    assert asyncio.run(fwdlink.request(d.path, good("2001:db8::1"), 2.0)) is FwStatus.LIMIT
    first = ipc.decode_request(d.received[0])
    assert dataclasses.replace(first, deadline_ms=None) == good()
    assert first.deadline_ms is not None and first.deadline_ms <= ipc.now_ms() + 2000
    assert ipc.decode_request(d.received[1]).addr == ipaddress.IPv6Address("2001:db8::1")


@pytest.mark.parametrize("reply", [b"garbage!", b"", struct.pack(">4sBBH", b"FKFW", 1, 99, 0)])
def test_clients_raise_on_garbage(fake, reply: bytes) -> None:  # type: ignore[no-untyped-def]
    d = fake(reply)
    with pytest.raises(FirewallError):
        fwd_client.request_sync(d.path, good(), 2.0)
    with pytest.raises(FirewallError):
        asyncio.run(fwdlink.request(d.path, good(), 2.0))


def test_clients_raise_on_timeout(fake) -> None:  # type: ignore[no-untyped-def]
    d = fake(None)
    with pytest.raises(FirewallError, match="timed out"):
        fwd_client.request_sync(d.path, good(), 0.2)
    with pytest.raises(FirewallError, match="timed out"):
        asyncio.run(fwdlink.request(d.path, good(), 0.2))


def test_clients_raise_when_unreachable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(FirewallError, match="unreachable"):
        fwd_client.request_sync(path, good(), 1.0)
    with pytest.raises(FirewallError, match="unreachable"):
        asyncio.run(fwdlink.request(path, good(), 1.0))
