"""A blocking fastknockfwd client for the tests (fastknockd uses ``knockd.fwdlink.request``).

Same contract as ``fastknock.knockd.fwdlink.request``: an answer is an ``FwStatus``; no
answer (timeout, no socket, a short or garbled reply) is a ``FirewallError``.
"""

from __future__ import annotations

import dataclasses
import socket

from fastknock import ipc
from fastknock.errors import FirewallError, WireError
from fastknock.ipc import FwRequest, FwStatus


def request_sync(path: str, req: FwRequest, timeout: float) -> FwStatus:
    """Send one request to fastknockfwd and wait for its reply, blocking (deadline: the
    end of this wait, as fastknockd's link sets it)."""
    if req.deadline_ms is None:
        req = dataclasses.replace(req, deadline_ms=ipc.deadline_after(timeout))
    data = ipc.encode_request(req)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may have answered and closed before reading

            reply = b""
            while len(reply) < ipc.REPLY_SIZE:
                chunk = sock.recv(ipc.REPLY_SIZE - len(reply))
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        raise FirewallError(f"firewall daemon at {path} timed out") from None
    except OSError as exc:
        raise FirewallError(f"firewall daemon at {path} unreachable: {exc}") from exc
    try:
        return ipc.decode_reply(reply)
    except WireError as exc:
        raise FirewallError(f"firewall daemon at {path} sent garbage: {exc}") from exc
