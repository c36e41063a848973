"""What the sans-I/O endpoint asks its I/O layer to do (``Endpoint.actions()``).

Plain frozen records; ``control.Controller.flush`` is the one interpreter of them in
fastknockd, ``tests/loopback_server.py`` the one of the threaded test server.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastknock.protocol import FirewallRequest


@dataclass(frozen=True, slots=True)
class SendDatagram:
    data: bytes
    addr: object  # the socket address the datagram came from, as the I/O layer gave it


@dataclass(frozen=True, slots=True)
class StreamWrite:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamClose:
    conn: int


@dataclass(frozen=True, slots=True)
class AskFirewall:
    """Run ``request`` (within ``deadline``), then call ``firewall_done(ticket, ok, now)``."""

    ticket: object
    request: FirewallRequest
    deadline: float


Action = SendDatagram | StreamWrite | StreamClose | AskFirewall


__all__ = ["Action", "AskFirewall", "SendDatagram", "StreamClose", "StreamWrite"]
