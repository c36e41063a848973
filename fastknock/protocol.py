"""Sans-I/O core of the knock protocol: the server and client state machines of PROTOCOL.md.

No sockets, no clock, no randomness in here: callers pass bytes, the peer address and ``now``,
and inject ``rand(n) -> bytes``; the core returns events (``events.py``: bytes to send, a
firewall request, a session end with its reason). The asyncio/uvloop layers (``knockd/``,
``knock/client.py``) are thin loops around it, and the tests drive client and server against
each other in memory.

Server rules, in order, for one control session (PROTOCOL.md "Flow"):

  1. The first message must be KNOCK or REVOKE; it fixes USER and RESOURCE. Every later message
     must carry the same USER and RESOURCE and the expected operation, else the session ends.
  2. Unknown USER -> fail. Bad AUTH over the zero challenge -> fail. Now *basic-auth*.
  3. Unknown RESOURCE, a resource whose ``users:`` excludes USER, a port resource on port 0 or
     on the control port -> fail.
  4. Send CHALLENGE with a fresh token, wait for RESPONSE; bad AUTH -> fail. Now
     *full-auth*. The token is valid for this one session's one RESPONSE. (TCP: a random
     token held by the session. UDP: a token computed from a rotating secret and the peer,
     no state at all until a RESPONSE matches one: ``knockd/challenges.py``.)
  5. Ask the firewall to install (KNOCK) or remove (REVOKE) the lease. Failure -> fail.
  6. Send COMEIN. End.

"Fail" ends the session and sends GOAWAY only where ``control-error-policy`` allows it
(``always``: any state; ``basic-auth``: basic- or full-auth; ``full-auth``: full-auth only).

Transitions (the one table; everything else is a failure):

  server  (no session) --first msg passes rules 1-3--> CHALLENGED   [send CHALLENGE]  (TCP)
          CHALLENGED   --same bytes as first msg-->    CHALLENGED   [re-send same CHALLENGE]
          CHALLENGED   --valid RESPONSE-->             FIREWALL     [FirewallRequest]
          (no session) --first msg passes rules 1-3--> (no session) [send computed CHALLENGE] (UDP)
          (no session) --RESPONSE matches a token-->   FIREWALL     [FirewallRequest]  (UDP)
          FIREWALL     --firewall ok-->                CLOSED ok    [send COMEIN]
  client  IDLE --start()--> AWAIT_CHALLENGE --CHALLENGE--> AWAIT_COMEIN --COMEIN--> DONE

The first message of a session is checked with the fused ``KeyRing.check`` (size, magic,
operation, user, MAC: cheapest first) before any state exists, so a flood of junk never
allocates a session. Peer input never raises: it ends in a ``SessionClosed`` with a reason.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fastknock import wire
from fastknock.addr import IPAddress
from fastknock.conf.config import Config, ErrorPolicy, Resource
from fastknock.conf.model import Refusal, admit
from fastknock.errors import ProtocolError, WireError
from fastknock.events import Event, FirewallRequest, Outcome, Send, SessionClosed
from fastknock.mac import HmacKey, KeyRing
from fastknock.message import (
    AUTH_SIZE,
    SALT_SIZE,
    UNKNOWN_ID,
    ZERO_CHALLENGE,
    Message,
    Operation,
    Reason,
)

Rand = Callable[[int], bytes]

FIRST_OPS = (1 << Operation.KNOCK) | (1 << Operation.REVOKE)


_REASON_OUTCOME = {
    Reason.SIZE: Outcome.SIZE,
    Reason.MAGIC: Outcome.MAGIC,
    Reason.OPERATION: Outcome.OPERATION,
    Reason.UNKNOWN_USER: Outcome.UNKNOWN_USER,
    Reason.MAC: Outcome.MAC,
}


class AuthLevel(enum.IntEnum):
    NONE = 0
    BASIC = 1
    FULL = 2


_POLICY_MIN_LEVEL = {
    ErrorPolicy.ALWAYS: AuthLevel.NONE,
    ErrorPolicy.BASIC_AUTH: AuthLevel.BASIC,
    ErrorPolicy.FULL_AUTH: AuthLevel.FULL,
}


def _pack(op: Operation, user: int, resource: int, salt: bytes, auth: bytes) -> bytes:
    return wire.pack(op, user, resource, salt, auth)


# -- server --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the server core needs of the config (build with ``ServerSettings.from_config``)."""

    keyring: KeyRing
    resources: Mapping[int, Resource]
    control_port: int
    policy: ErrorPolicy = ErrorPolicy.ALWAYS
    timeout: float = 5.0
    users: tuple[int, ...] = ()  # the ids in [KEYS] (the key ring does not list them)

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        return cls(
            keyring=KeyRing(config.keys),
            resources=config.resources,
            control_port=config.port,
            policy=config.control_error_policy,
            timeout=config.control_timeout,
            users=tuple(sorted(config.keys)),
        )


class ServerCore:
    """Turns first datagrams into sessions. Holds no per-peer state itself."""

    def __init__(self, settings: ServerSettings, rand: Rand) -> None:
        self.settings = settings
        self._rand = rand
        self._min_level = _POLICY_MIN_LEVEL[settings.policy]

    def goaway(self, level: AuthLevel, user: int, resource: int) -> list[Event]:
        """A GOAWAY to send, if the error policy allows one at this auth level."""
        if level < self._min_level:
            return []
        return [
            Send(_pack(Operation.GOAWAY, user, resource, self._rand(SALT_SIZE), ZERO_CHALLENGE))
        ]

    def start(
        self, data: bytes, peer: IPAddress, now: float
    ) -> tuple[ServerSession | None, list[Event]]:
        """Handle the first message of a would-be session (rules 1-4).

        Returns the live session (waiting for RESPONSE) or None, and the events to act on.
        A rejected datagram creates no state; under policy ``always`` it may still get a
        GOAWAY (built statelessly here).
        """
        msg, events = self.first(data)
        if msg is None:
            return None, events
        session = ServerSession(self, bytes(data), msg, peer, now)
        return session, [Send(session.challenge_bytes)]

    def first(self, data: bytes) -> tuple[Message | None, list[Event]]:
        """Rules 1-3 for a first message: the message if it passes (now *basic-auth*), else
        None and the events of the rejection (a GOAWAY if the policy allows, the end)."""
        reason, msg = self.settings.keyring.check(data, FIRST_OPS)
        if reason != Reason.OK or msg is None:
            user = resource = UNKNOWN_ID
            if reason in (Reason.UNKNOWN_USER, Reason.MAC):
                # Magic and operation were fine: the ids are readable (not trusted).
                user = int.from_bytes(data[8:12], "big")
                resource = int.from_bytes(data[12:16], "big")
            closed = SessionClosed(_REASON_OUTCOME[Reason(reason)], None, user, resource)
            return None, [*self.goaway(AuthLevel.NONE, user, resource), closed]
        outcome = self._check_resource(msg)
        if outcome is not None:
            closed = SessionClosed(outcome, Operation(msg.operation), msg.user, msg.resource)
            return None, [*self.goaway(AuthLevel.BASIC, msg.user, msg.resource), closed]
        return msg, []

    def authenticated(
        self, op: Operation, msg: Message, peer: IPAddress, now: float
    ) -> tuple[ServerSession | None, list[Event]]:
        """A RESPONSE ``msg`` matched a stateless (UDP) token for ``op``: the session
        starts *full-auth*, waiting for the firewall. Rule 3 is checked again (a reload
        may have changed the resource since the CHALLENGE)."""
        outcome = self._check_resource(msg)
        if outcome is not None:
            closed = SessionClosed(outcome, op, msg.user, msg.resource)
            return None, [*self.goaway(AuthLevel.FULL, msg.user, msg.resource), closed]
        session = ServerSession(self, b"", msg, peer, now, op)
        return session, [FirewallRequest(op, msg.user, msg.resource, peer)]

    def refuse(self, outcome: Outcome, msg: Message | None) -> list[Event]:
        """A message from a peer without state that is no valid first message and matches
        no token: the end, with a GOAWAY only under policy ``always`` (state "none")."""
        user = msg.user if msg is not None else UNKNOWN_ID
        resource = msg.resource if msg is not None else UNKNOWN_ID
        return [*self.goaway(AuthLevel.NONE, user, resource), SessionClosed(outcome, None, user,
                resource)]  # fmt: skip

    def silent_peer(self) -> list[Event]:
        """No complete first message within the control timeout (a TCP peer that connected
        and sent nothing, or part of a message): the session ends in state "none", so only
        policy ``always`` sends a GOAWAY."""
        return [
            *self.goaway(AuthLevel.NONE, UNKNOWN_ID, UNKNOWN_ID),
            SessionClosed(Outcome.TIMEOUT),
        ]

    def grants(self) -> frozenset[int]:
        """Every (user << 32 | resource) that passes rule 3, for the C reader's table."""
        s = self.settings
        return frozenset(
            user << 32 | rid
            for user in s.users
            for rid in s.resources
            if not isinstance(admit(s.resources, s.keyring, s.control_port, user, rid), Refusal)
        )

    def _check_resource(self, msg: Message) -> Outcome | None:
        s = self.settings
        found = admit(s.resources, s.keyring, s.control_port, msg.user, msg.resource)
        return Outcome(found.value) if isinstance(found, Refusal) else None

    def rand(self, n: int) -> bytes:
        return self._rand(n)


class ServerState(enum.Enum):
    CHALLENGED = "challenged"
    FIREWALL = "firewall"
    CLOSED = "closed"


class ServerSession:
    """One control session that passed basic auth. Created only by ``ServerCore.start``."""

    __slots__ = (
        "_core",
        "_first",
        "_token",
        "challenge_bytes",
        "operation",
        "user",
        "resource",
        "peer",
        "state",
        "level",
        "deadline",
    )

    def __init__(
        self,
        core: ServerCore,
        first: bytes,
        msg: Message,
        peer: IPAddress,
        now: float,
        authenticated: Operation | None = None,
    ) -> None:
        """A session that passed basic auth (``first``: its first message), or, with
        ``authenticated`` (the operation a stateless token proved), one at full auth."""
        self._core = core
        self._first = first
        self.user = msg.user
        self.resource = msg.resource
        self.peer = peer
        self.deadline = now + core.settings.timeout
        if authenticated is not None:
            self.operation = authenticated
            self.level = AuthLevel.FULL
            self._token = ZERO_CHALLENGE
            self.challenge_bytes = b""
            self.state = ServerState.FIREWALL
            return
        self.operation = Operation(msg.operation)
        self.level = AuthLevel.BASIC
        self._token = core.rand(AUTH_SIZE)
        self.challenge_bytes = _pack(
            Operation.CHALLENGE, self.user, self.resource, core.rand(SALT_SIZE), self._token
        )
        self.state = ServerState.CHALLENGED

    def __repr__(self) -> str:  # no token, no key material
        return (
            f"ServerSession({self.peer}, {self.operation.name}, user={self.user:08X}, "
            f"resource={self.resource:08X}, {self.state.value})"
        )

    @property
    def closed(self) -> bool:
        return self.state is ServerState.CLOSED

    def _fail(self, outcome: Outcome) -> list[Event]:
        self.state = ServerState.CLOSED
        self._token = ZERO_CHALLENGE
        return [
            *self._core.goaway(self.level, self.user, self.resource),
            SessionClosed(outcome, self.operation, self.user, self.resource),
        ]

    def receive(self, data: bytes, now: float) -> list[Event]:
        """A later message from the peer (rules 1 and 4)."""
        if self.state is ServerState.CLOSED:
            return []
        if self.state is ServerState.CHALLENGED and bytes(data) == self._first:
            # A retransmitted first datagram (UDP): answer with the very same CHALLENGE.
            return [Send(self.challenge_bytes)]
        if self.state is not ServerState.CHALLENGED:
            # Anything while the firewall works is out of sequence.
            return self._fail(Outcome.SEQUENCE)
        try:
            msg = wire.parse(data)
        except WireError:
            return self._fail(Outcome.SEQUENCE)
        if (
            msg.operation != Operation.RESPONSE
            or msg.user != self.user
            or msg.resource != self.resource
        ):
            return self._fail(Outcome.SEQUENCE)
        key = self._core.settings.keyring.get(self.user)
        if key is None or not key.verify_message(msg, self._token):
            return self._fail(Outcome.RESPONSE_MAC)
        self._token = ZERO_CHALLENGE  # one RESPONSE per token
        self.level = AuthLevel.FULL
        self.state = ServerState.FIREWALL
        self.deadline = now + self._core.settings.timeout
        return [FirewallRequest(self.operation, self.user, self.resource, self.peer)]

    def firewall_done(self, ok: bool, now: float) -> list[Event]:
        """The firewall daemon answered the ``FirewallRequest`` (rules 5 and 6)."""
        if self.state is not ServerState.FIREWALL:
            raise ProtocolError(f"firewall_done() in state {self.state.value}")
        if not ok:
            return self._fail(Outcome.FIREWALL)
        self.state = ServerState.CLOSED
        comein = _pack(
            Operation.COMEIN, self.user, self.resource, self._core.rand(SALT_SIZE), ZERO_CHALLENGE
        )
        return [
            Send(comein),
            SessionClosed(Outcome.OK, self.operation, self.user, self.resource),
        ]

    def timeout(self, now: float) -> list[Event]:
        """Call when ``now >= deadline``; ends the session."""
        if self.state is ServerState.CLOSED or now < self.deadline:
            return []
        return self._fail(Outcome.TIMEOUT)


# -- client --------------------------------------------------------------------------------


class ClientState(enum.Enum):
    IDLE = "idle"
    AWAIT_CHALLENGE = "await-challenge"
    AWAIT_COMEIN = "await-comein"
    DONE = "done"
    FAILED = "failed"


class ClientFailure(enum.Enum):
    GOAWAY = "the server refused (GOAWAY)"
    BAD_REPLY = "bad reply from the server"


@dataclass(frozen=True, slots=True)
class ClientResult:
    """What the client I/O layer must do after ``receive``: send ``send`` (if any) and, once
    ``done``, stop with success (``failure is None``) or the failure."""

    send: bytes | None = None
    done: bool = False
    failure: ClientFailure | None = None
    detail: str = ""


class ClientSession:
    """The client side of one knock or revoke: KNOCK -> CHALLENGE -> RESPONSE -> COMEIN."""

    def __init__(
        self, key: HmacKey, user: int, resource: int, operation: Operation, rand: Rand
    ) -> None:
        if operation not in (Operation.KNOCK, Operation.REVOKE):
            raise ProtocolError(f"a client session starts with KNOCK or REVOKE, not {operation!r}")
        self._key = key
        self.user = user
        self.resource = resource
        self.operation = operation
        self._rand = rand
        self.state = ClientState.IDLE
        self.first = b""
        self._challenge = b""
        self._response = b""

    def __repr__(self) -> str:
        return (
            f"ClientSession({self.operation.name}, user={self.user:08X}, "
            f"resource={self.resource:08X}, {self.state.value})"
        )

    def start(self) -> bytes:
        """The KNOCK/REVOKE message. Retransmit these same bytes over UDP if no reply comes."""
        if self.state is not ClientState.IDLE:
            raise ProtocolError("start() called twice")
        salt = self._rand(SALT_SIZE)
        auth = self._key.sign(self.operation, self.user, self.resource, salt)
        self.first = _pack(self.operation, self.user, self.resource, salt, auth)
        self.state = ClientState.AWAIT_CHALLENGE
        return self.first

    def _failed(self, failure: ClientFailure, detail: str) -> ClientResult:
        self.state = ClientState.FAILED
        return ClientResult(done=True, failure=failure, detail=detail)

    def receive(self, data: bytes) -> ClientResult:
        if self.state not in (ClientState.AWAIT_CHALLENGE, ClientState.AWAIT_COMEIN):
            raise ProtocolError(f"receive() in state {self.state.value}")
        try:
            msg = wire.parse(data)
        except WireError as exc:
            return self._failed(ClientFailure.BAD_REPLY, str(exc))
        op = msg.operation
        if op == Operation.GOAWAY:
            return self._failed(ClientFailure.GOAWAY, "")
        if msg.user != self.user or msg.resource != self.resource:
            return self._failed(ClientFailure.BAD_REPLY, "reply for another user or resource")
        if op == Operation.CHALLENGE:
            if self.state is ClientState.AWAIT_COMEIN:
                if msg.auth == self._challenge:
                    # The server answered a retransmitted KNOCK again: same RESPONSE again.
                    return ClientResult(send=self._response)
                return self._failed(ClientFailure.BAD_REPLY, "second, different CHALLENGE")
            self._challenge = msg.auth
            salt = self._rand(SALT_SIZE)
            auth = self._key.sign(Operation.RESPONSE, self.user, self.resource, salt, msg.auth)
            self._response = _pack(Operation.RESPONSE, self.user, self.resource, salt, auth)
            self.state = ClientState.AWAIT_COMEIN
            return ClientResult(send=self._response)
        if op == Operation.COMEIN and self.state is ClientState.AWAIT_COMEIN:
            self.state = ClientState.DONE
            return ClientResult(done=True)
        return self._failed(ClientFailure.BAD_REPLY, f"unexpected {Operation(op).name}")


__all__ = [
    "AuthLevel",
    "ClientFailure",
    "ClientResult",
    "ClientSession",
    "ClientState",
    "Event",
    "FirewallRequest",
    "Outcome",
    "SessionClosed",
    "Send",
    "ServerCore",
    "ServerSession",
    "ServerSettings",
    "ServerState",
]
