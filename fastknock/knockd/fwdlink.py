"""fastknockd's side of the link to fastknockfwd: one asyncio request per lease change.

Design
------
The codec, the socket path and the status codes are ``fastknock.ipc`` (shared with the root
daemon, which must not carry a client). Here: connect to the Unix socket, write the
request (with the deadline of this wait, ``ipc.deadline_after(timeout)``: fwd never applies
it later), read the 8-byte reply, close. Every failure to get an answer (timeout, refused
or missing socket, a short or garbled reply) is a ``FirewallError`` with the path in its
message; a NACK is a normal answer (an ``FwStatus`` other than ACK). The daemon may answer
and close before it reads the request (a refused peer): a failed drain is not an error, the
reply is still read.

``FwdLink`` is the firewall callable ``Controller`` is given: it maps an endpoint's
``FirewallRequest`` to one request with the config checksum and logs refusals (True only
on ACK).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from fastknock import ipc
from fastknock.errors import FastknockError, FirewallError, WireError
from fastknock.events import FirewallRequest
from fastknock.ipc import (
    REPLY_SIZE,
    FwRequest,
    FwStatus,
    deadline_after,
    decode_reply,
    encode_request,
)
from fastknock.message import Operation

__all__ = ["FwdLink", "request"]

log = logging.getLogger("fastknockd")


async def _exchange(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the daemon may have answered and closed before reading: read the answer
        return await reader.readexactly(REPLY_SIZE)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def request(path: str, req: FwRequest, timeout: float) -> FwStatus:
    """Send one request to fastknockfwd; raise FirewallError if it cannot be answered.
    The request carries the deadline of this wait: fwd never applies it later."""
    data = encode_request(dataclasses.replace(req, deadline_ms=deadline_after(timeout)))
    try:
        reply = await asyncio.wait_for(_exchange(path, data), timeout)
    except asyncio.TimeoutError:
        raise FirewallError(f"firewall daemon at {path} timed out") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise FirewallError(f"firewall daemon at {path} unreachable: {exc}") from exc
    try:
        return decode_reply(reply)
    except WireError as exc:
        raise FirewallError(f"firewall daemon at {path} sent garbage: {exc}") from exc


class FwdLink:
    """The firewall callable for ``Controller``: one fastknockfwd request per lease change."""

    def __init__(self, path: str, checksum: bytes) -> None:
        self.path = path
        self.checksum = checksum

    async def __call__(self, change: FirewallRequest, timeout: float) -> bool:
        op = ipc.FwOp.INSTALL if change.operation is Operation.KNOCK else ipc.FwOp.REVOKE
        req = ipc.FwRequest(op, change.user, change.resource, change.peer, self.checksum)
        try:
            status = await request(self.path, req, timeout)
        except FastknockError as exc:
            log.warning("firewall: %s", exc)
            return False
        if status is not ipc.FwStatus.ACK:
            log.warning(
                "[%s] firewall refused resource %08X for user %08X: %s",
                change.peer,
                change.resource,
                change.user,
                status.name,
            )
            return False
        return True
