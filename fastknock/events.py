"""The sans-I/O protocol core's outputs: events and the outcome of a session.

``protocol.ServerCore`` / ``ServerSession`` return lists of these; the endpoint
(``knockd/endpoint.py``) interprets them, once. ``Outcome`` names why a session ended, for
the logs and the counters (``knockd/counters.py`` has one counter per outcome).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fastknock.addr import IPAddress
from fastknock.message import UNKNOWN_ID, Operation


class Outcome(enum.Enum):
    """Why a server session ended (or a first datagram was turned away). For logs and counters."""

    OK = "ok"
    SIZE = "size"
    MAGIC = "magic"
    OPERATION = "operation"
    UNKNOWN_USER = "unknown-user"
    MAC = "mac"
    UNKNOWN_RESOURCE = "unknown-resource"
    USER_NOT_ALLOWED = "user-not-allowed"
    BAD_PORT = "bad-port"
    SEQUENCE = "sequence"  # later message with another op, user or resource
    RESPONSE_MAC = "response-mac"
    REPLAY = "replay"  # UDP: a RESPONSE for a token that was used already
    FIREWALL = "firewall"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Send:
    """Send these 56 bytes to the session's peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FirewallRequest:
    """Ask the firewall daemon to install (KNOCK) or remove (REVOKE) a lease for ``peer``."""

    operation: Operation
    user: int
    resource: int
    peer: IPAddress


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over; ``outcome`` says why. ``user``/``resource``: UNKNOWN_ID if unknown."""

    outcome: Outcome
    operation: Operation | None = None
    user: int = UNKNOWN_ID
    resource: int = UNKNOWN_ID

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


Event = Send | FirewallRequest | SessionClosed


__all__ = ["Event", "FirewallRequest", "Outcome", "Send", "SessionClosed"]
