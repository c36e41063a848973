"""The client's I/O: run one sans-I/O ``ClientSession`` over TCP or UDP with blocking sockets.

The client is a short-lived command (often run from ``~/.ssh/config``), so it uses plain
blocking sockets with timeouts, not an event loop: fast to import, easy to reason about.
Both address families are knocked concurrently in threads when a host has both.

Every step (connect, each send, each receive) is bounded by ``control-timeout``. Over UDP the
KNOCK/REVOKE datagram is re-sent (the same bytes) every ``timeout / RETRANSMITS`` until a reply
arrives, so one lost datagram doesn't fail the knock; the server answers a duplicate of a
session's first datagram with the very same CHALLENGE. Only the first datagram is re-sent: a
RESPONSE is never repeated (the server accepts a token once).

UDP with a TCP fallback (``Target.fallback_tcp``: the config offers both transports and
UDP was asked for): if the first datagram gets no answer within half the control timeout
(a lost path, no UDP listener, or a flood that the server's pre-filter sheds), the knock
is run again over TCP, with a fresh session and the full timeout per step. Only silence
falls back: a refusal over UDP is final.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastknock.errors import KnockError
from fastknock.mac import HmacKey
from fastknock.message import MSG_SIZE, Operation
from fastknock.protocol import ClientSession

RETRANSMITS = 4

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Target:
    address: str  # numeric address
    family: socket.AddressFamily
    port: int  # control port
    udp: bool
    fallback_tcp: bool = False  # UDP only: knock again over TCP if UDP gets no answer

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == socket.AF_INET6 else self.address
        return f"{host}:{self.port}/{'udp' if self.udp else 'tcp'}"


def _quiet(_: str) -> None:
    pass


def run_session(
    target: Target,
    key: HmacKey,
    user: int,
    resource: int,
    operation: Operation,
    timeout: float,
    log: Log = _quiet,
) -> None:
    """Knock (or revoke) once at ``target``. Returns after COMEIN, raises KnockError otherwise."""

    def attempt(to: Target, first_wait: float | None = None) -> None:
        session = ClientSession(key, user, resource, operation, os.urandom)
        what = f"{operation.name} user {user:08X} resource {resource:08X}"
        _attempt(to, session, what, timeout, log, first_wait)

    if target.udp and target.fallback_tcp:
        try:
            attempt(target, first_wait=timeout / 2)
            return
        except _NoAnswer:
            log(f"{target}: no answer over UDP within {timeout / 2:g} s, falling back to TCP")
        target = dataclasses.replace(target, udp=False, fallback_tcp=False)
    attempt(target)


class _NoAnswer(Exception):
    """The first datagram got no answer (only raised when a fallback is possible)."""


def _attempt(
    target: Target,
    session: ClientSession,
    what: str,
    timeout: float,
    log: Log,
    first_wait: float | None,
) -> None:
    kind = socket.SOCK_DGRAM if target.udp else socket.SOCK_STREAM
    try:
        with socket.socket(target.family, kind) as sock:
            sock.settimeout(timeout)
            if not target.udp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log(f"{target}: connecting")
            sock.connect((target.address, target.port))
            first = session.start()
            log(f"{target}: sending {what}")
            sock.sendall(first)
            try:
                reply = _receive(sock, target, first_wait or timeout, resend=first, log=log)
            except (TimeoutError, ConnectionRefusedError):  # silence, or ICMP unreachable
                if first_wait is None:
                    raise
                raise _NoAnswer from None
            while True:
                log(f"{target}: received {_op_name(reply)}")
                result = session.receive(reply)
                if result.send is not None:
                    log(f"{target}: sending RESPONSE")
                    sock.sendall(result.send)
                if result.done:
                    if result.failure is not None:
                        detail = f": {result.detail}" if result.detail else ""
                        raise KnockError(f"{target}: {result.failure.value}{detail}")
                    log(f"{target}: COMEIN, done")
                    return
                reply = _receive(sock, target, timeout, resend=None, log=log)
    except ConnectionRefusedError:
        raise KnockError(f"{target}: connection refused") from None
    except TimeoutError:
        raise KnockError(f"{target}: timeout after {timeout:g} s (no reply)") from None
    except OSError as exc:
        raise KnockError(f"{target}: {exc.strerror or exc}") from None


def _op_name(data: bytes) -> str:
    op = int.from_bytes(data[4:8], "big")
    try:
        return Operation(op).name
    except ValueError:
        return f"message with operation {op}"


def _receive(
    sock: socket.socket, target: Target, timeout: float, resend: bytes | None, log: Log
) -> bytes:
    """One 56-byte message, within ``timeout``; over UDP, re-send ``resend`` meanwhile."""
    deadline = time.monotonic() + timeout
    if not target.udp:
        buf = bytearray()
        while len(buf) < MSG_SIZE:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(MSG_SIZE - len(buf))
            if not chunk:
                raise KnockError(f"{target}: the server closed the connection")
            buf += chunk
        return bytes(buf)
    interval = timeout / RETRANSMITS
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(min(left, interval) if resend is not None else left)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            if resend is not None and deadline - time.monotonic() > 0:
                log(f"{target}: no reply yet, re-sending")
                sock.send(resend)
            continue
        if len(data) == MSG_SIZE:
            return data
        log(f"{target}: ignoring a {len(data)}-byte datagram")
