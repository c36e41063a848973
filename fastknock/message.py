"""Protocol constants and the decoded message type, shared by every implementation.

PROTOCOL.md is the contract: every message is 56 bytes, big-endian,
MAGIC(4) OPERATION(4) USER(4) RESOURCE(4) SALT(8) AUTH(32).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

MAGIC = 0x3B1BB719
MSG_SIZE = 56
SALT_SIZE = 8
AUTH_SIZE = 32
KEY_SIZE = 32
# OPERATION || USER || RESOURCE || SALT || CHALLENGE_TOKEN
AUTH_INPUT_SIZE = 4 + 4 + 4 + SALT_SIZE + AUTH_SIZE
ZERO_CHALLENGE = bytes(AUTH_SIZE)
UNKNOWN_ID = 0xFFFFFFFF


class Operation(enum.IntEnum):
    KNOCK = 0
    CHALLENGE = 1
    RESPONSE = 2
    COMEIN = 3
    GOAWAY = 4
    REVOKE = 5


class Reason(enum.IntEnum):
    """Why a datagram was rejected by the fused parse-and-verify check (0 = accepted).

    Ordered cheapest check first: size, magic, operation, user, MAC.
    """

    OK = 0
    SIZE = 1
    MAGIC = 2
    OPERATION = 3
    UNKNOWN_USER = 4
    MAC = 5


class Message(NamedTuple):
    """One decoded protocol message. ``operation`` is an ``Operation`` value (an int)."""

    operation: int
    user: int
    resource: int
    salt: bytes
    auth: bytes
