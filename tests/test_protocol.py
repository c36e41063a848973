"""The sans-I/O client and server driven against each other in memory, with an explicit clock.

Every rule of PROTOCOL.md's server flow and each error policy, on both implementations of the
codec and MAC (the ``proto`` fixture swaps the wire module and builds keys with the impl's mac).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fastknock import addr, protocol
from fastknock.conf.config import ErrorPolicy, JumpResource, PortResource
from fastknock.errors import ProtocolError
from fastknock.message import UNKNOWN_ID, Operation
from fastknock.protocol import (
    ClientFailure,
    ClientSession,
    FirewallRequest,
    Outcome,
    Send,
    ServerCore,
    ServerSettings,
    SessionClosed,
)

USER = 0x12345678
OTHER_USER = 0x0000000A
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
OTHER_KEY = bytes(range(1, 33))
RES_PORT = 0x87654321
RES_JUMP = 0xAABBCCDD
RES_OTHERS_ONLY = 0x00000003
RES_CONTROL = 0x00000004
CONTROL_PORT = 5800
PEER = ipaddress.ip_address("192.0.2.7")


def counter_rand() -> protocol.Rand:
    """Deterministic but never-repeating 'randomness' for reproducible sessions."""
    counter = itertools.count(1)

    def rand(n: int) -> bytes:
        return next(counter).to_bytes(8, "big").rjust(n, b"\x5a")[:n]

    return rand


@pytest.fixture
def proto(impl: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    monkeypatch.setattr(protocol, "wire", impl.wire)

    def make(policy: ErrorPolicy = ErrorPolicy.ALWAYS) -> ServerCore:
        settings = ServerSettings(
            keyring=impl.mac.KeyRing({USER: KEY, OTHER_USER: OTHER_KEY}),
            resources={
                RES_PORT: PortResource(RES_PORT, 42),
                RES_JUMP: JumpResource(RES_JUMP, input="MYCHAIN-INPUT", users=frozenset({USER})),
                RES_OTHERS_ONLY: PortResource(RES_OTHERS_ONLY, 43, users=frozenset({OTHER_USER})),
                RES_CONTROL: PortResource(RES_CONTROL, CONTROL_PORT),
            },
            control_port=CONTROL_PORT,
            policy=policy,
            timeout=5.0,
        )
        return ServerCore(settings, counter_rand())

    def client(
        op: Operation = Operation.KNOCK, user: int = USER, key: bytes = KEY, res: int = RES_PORT
    ) -> ClientSession:
        return ClientSession(impl.mac.HmacKey(key), user, res, op, counter_rand())

    yield SimpleNamespace(server=make, client=client, wire=impl.wire)


def sends(events: list[protocol.Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Send)]


def closed(events: list[protocol.Event]) -> SessionClosed:
    (end,) = [e for e in events if isinstance(e, SessionClosed)]
    return end


@pytest.mark.parametrize("op", [Operation.KNOCK, Operation.REVOKE])
@pytest.mark.parametrize("res", [RES_PORT, RES_JUMP])
def test_full_flow(proto: SimpleNamespace, op: Operation, res: int) -> None:
    server, client = proto.server(), proto.client(op, res=res)
    session, events = server.start(client.start(), PEER, now=100.0)
    assert session is not None
    (challenge,) = sends(events)
    assert proto.wire.parse(challenge).operation == Operation.CHALLENGE

    reply = client.receive(challenge)
    assert reply.send is not None and not reply.done
    events = session.receive(reply.send, now=101.0)
    assert events == [FirewallRequest(op, USER, res, PEER)]

    events = session.firewall_done(True, now=101.5)
    assert closed(events) == SessionClosed(Outcome.OK, op, USER, res)
    assert session.closed
    (comein,) = sends(events)
    result = client.receive(comein)
    assert result.done and result.failure is None


def test_challenge_token_is_fresh_per_session(proto: SimpleNamespace) -> None:
    server, client = proto.server(), proto.client()
    knock = client.start()
    s1, e1 = server.start(knock, PEER, 0.0)
    s2, e2 = server.start(knock, PEER, 0.0)  # a replayed KNOCK only ever yields a CHALLENGE
    c1, c2 = proto.wire.parse(sends(e1)[0]), proto.wire.parse(sends(e2)[0])
    assert c1.operation == c2.operation == Operation.CHALLENGE
    assert c1.auth != c2.auth


def test_replayed_response_on_new_session_fails(proto: SimpleNamespace) -> None:
    server, client = proto.server(), proto.client()
    knock = client.start()
    s1, e1 = server.start(knock, PEER, 0.0)
    response = client.receive(sends(e1)[0]).send
    assert response is not None
    s2, _ = server.start(knock, PEER, 0.0)  # attacker replays the KNOCK, then the RESPONSE
    assert s2 is not None
    events = s2.receive(response, 0.5)
    assert not any(isinstance(e, FirewallRequest) for e in events)
    assert closed(events).outcome is Outcome.RESPONSE_MAC


def test_token_is_valid_for_one_response_only(proto: SimpleNamespace) -> None:
    server, client = proto.server(), proto.client()
    session, events = server.start(client.start(), PEER, 0.0)
    response = client.receive(sends(events)[0]).send
    assert session is not None and response is not None
    assert isinstance(session.receive(response, 0.1)[0], FirewallRequest)
    again = session.receive(response, 0.2)
    assert not any(isinstance(e, FirewallRequest) for e in again)
    assert closed(again).outcome is Outcome.SEQUENCE


def test_duplicate_first_datagram_resends_same_challenge(proto: SimpleNamespace) -> None:
    server, client = proto.server(), proto.client()
    knock = client.start()
    session, events = server.start(knock, PEER, 0.0)
    assert session is not None
    assert session.receive(knock, 0.3) == [Send(sends(events)[0])]
    # The client answers both copies with the same RESPONSE; the flow still completes.
    first = client.receive(sends(events)[0]).send
    second = client.receive(sends(events)[0]).send
    assert first == second is not None
    assert isinstance(session.receive(first, 0.4)[0], FirewallRequest)


# -- failures and the error policies --------------------------------------------------------

POLICIES = [ErrorPolicy.ALWAYS, ErrorPolicy.BASIC_AUTH, ErrorPolicy.FULL_AUTH]


def expect_goaway(proto: SimpleNamespace, events: list[protocol.Event], wanted: bool) -> None:
    out = sends(events)
    if not wanted:
        assert out == []
        return
    (goaway,) = out
    msg = proto.wire.parse(goaway)
    assert msg.operation == Operation.GOAWAY
    end = closed(events)
    assert (msg.user, msg.resource) == (end.user, end.resource)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "first_op", [Operation.CHALLENGE, Operation.RESPONSE, Operation.COMEIN, Operation.GOAWAY]
)
def test_rule1_first_message_must_be_knock_or_revoke(
    proto: SimpleNamespace, policy: ErrorPolicy, first_op: Operation
) -> None:
    client = proto.client()
    msg = proto.wire.parse(client.start())
    forged = proto.wire.pack(first_op, msg.user, msg.resource, msg.salt, msg.auth)
    session, events = proto.server(policy).start(forged, PEER, 0.0)
    assert session is None
    assert closed(events).outcome is Outcome.OPERATION
    expect_goaway(proto, events, policy is ErrorPolicy.ALWAYS)


@pytest.mark.parametrize("policy", POLICIES)
def test_rule2_unknown_user(proto: SimpleNamespace, policy: ErrorPolicy) -> None:
    client = proto.client(user=0x0BADBEEF)
    session, events = proto.server(policy).start(client.start(), PEER, 0.0)
    assert session is None
    end = closed(events)
    assert end.outcome is Outcome.UNKNOWN_USER and end.user == 0x0BADBEEF
    expect_goaway(proto, events, policy is ErrorPolicy.ALWAYS)


@pytest.mark.parametrize("policy", POLICIES)
def test_rule2_bad_auth(proto: SimpleNamespace, policy: ErrorPolicy) -> None:
    client = proto.client(key=OTHER_KEY)  # right user id, wrong key
    session, events = proto.server(policy).start(client.start(), PEER, 0.0)
    assert session is None
    assert closed(events).outcome is Outcome.MAC
    expect_goaway(proto, events, policy is ErrorPolicy.ALWAYS)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("res", "outcome"),
    [
        (0x0000DEAD, Outcome.UNKNOWN_RESOURCE),
        (RES_OTHERS_ONLY, Outcome.USER_NOT_ALLOWED),
        (RES_CONTROL, Outcome.BAD_PORT),
    ],
)
def test_rule3_resource_checks(
    proto: SimpleNamespace, policy: ErrorPolicy, res: int, outcome: Outcome
) -> None:
    client = proto.client(res=res)
    session, events = proto.server(policy).start(client.start(), PEER, 0.0)
    assert session is None
    end = closed(events)
    assert (end.outcome, end.user, end.resource) == (outcome, USER, res)
    expect_goaway(proto, events, policy is not ErrorPolicy.FULL_AUTH)
    if sends(events):
        assert client.receive(sends(events)[0]).failure is ClientFailure.GOAWAY


def _challenged(proto: SimpleNamespace, policy: ErrorPolicy, **kw: object) -> tuple:
    client = proto.client(**kw)
    session, events = proto.server(policy).start(client.start(), PEER, 10.0)
    assert session is not None
    return client, session, sends(events)[0]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("field", "outcome"),
    [
        ("operation", Outcome.SEQUENCE),  # rule 1: later messages keep op, user, resource
        ("user", Outcome.SEQUENCE),
        ("resource", Outcome.SEQUENCE),
        ("auth", Outcome.RESPONSE_MAC),  # rule 4: the RESPONSE's AUTH must verify
    ],
)
def test_rules_1_and_4_spoiled_response(
    proto: SimpleNamespace, policy: ErrorPolicy, field: str, outcome: Outcome
) -> None:
    client, session, challenge = _challenged(proto, policy)
    msg = proto.wire.parse(client.receive(challenge).send)
    changed = {
        "operation": msg._replace(operation=Operation.KNOCK),
        "user": msg._replace(user=OTHER_USER),
        "resource": msg._replace(resource=RES_JUMP),
        "auth": msg._replace(auth=bytes(a ^ 1 for a in msg.auth)),
    }[field]
    events = session.receive(proto.wire.serialize(changed), 11.0)
    assert closed(events).outcome is outcome
    expect_goaway(proto, events, policy is not ErrorPolicy.FULL_AUTH)


@pytest.mark.parametrize("policy", POLICIES)
def test_rule4_garbage_response(proto: SimpleNamespace, policy: ErrorPolicy) -> None:
    _client, session, _challenge = _challenged(proto, policy)
    events = session.receive(b"\x00" * 56, 11.0)
    assert closed(events).outcome is Outcome.SEQUENCE
    expect_goaway(proto, events, policy is not ErrorPolicy.FULL_AUTH)


@pytest.mark.parametrize("policy", POLICIES)
def test_rule5_firewall_failure(proto: SimpleNamespace, policy: ErrorPolicy) -> None:
    client, session, challenge = _challenged(proto, policy)
    session.receive(client.receive(challenge).send, 11.0)
    events = session.firewall_done(False, 11.2)
    assert closed(events).outcome is Outcome.FIREWALL
    expect_goaway(proto, events, True)  # full-auth: every policy tells the client
    assert client.receive(sends(events)[0]).failure is ClientFailure.GOAWAY


@pytest.mark.parametrize("policy", POLICIES)
def test_timeouts(proto: SimpleNamespace, policy: ErrorPolicy) -> None:
    client, session, challenge = _challenged(proto, policy)
    assert session.deadline == 15.0
    assert session.timeout(14.9) == []
    events = session.timeout(15.0)
    assert closed(events).outcome is Outcome.TIMEOUT
    expect_goaway(proto, events, policy is not ErrorPolicy.FULL_AUTH)
    assert session.closed and session.receive(client.receive(challenge).send, 15.1) == []

    client, session, challenge = _challenged(proto, policy)
    session.receive(client.receive(challenge).send, 12.0)
    assert session.deadline == 17.0  # every step gets the full control timeout
    assert closed(session.timeout(17.0)).outcome is Outcome.TIMEOUT


def test_message_while_firewall_works_is_out_of_sequence(proto: SimpleNamespace) -> None:
    client, session, challenge = _challenged(proto, ErrorPolicy.ALWAYS)
    session.receive(client.receive(challenge).send, 11.0)
    events = session.receive(client.first, 11.1)
    assert closed(events).outcome is Outcome.SEQUENCE
    with pytest.raises(ProtocolError):
        session.firewall_done(True, 11.2)


@pytest.mark.parametrize("reason_bytes", [b"", b"\x00" * 55, b"\x00" * 57, b"\xff" * 56])
def test_junk_never_creates_a_session(proto: SimpleNamespace, reason_bytes: bytes) -> None:
    session, events = proto.server(ErrorPolicy.BASIC_AUTH).start(reason_bytes, PEER, 0.0)
    assert session is None and sends(events) == []
    assert closed(events).user == UNKNOWN_ID


# -- client side ----------------------------------------------------------------------------


def test_client_rejects_bad_replies(proto: SimpleNamespace) -> None:
    client = proto.client()
    knock = proto.wire.parse(client.start())
    early_comein = proto.wire.pack(Operation.COMEIN, USER, RES_PORT, bytes(8), bytes(32))
    assert client.receive(early_comein).failure is ClientFailure.BAD_REPLY

    client = proto.client()
    client.start()
    wrong = proto.wire.pack(Operation.CHALLENGE, OTHER_USER, RES_PORT, bytes(8), bytes(32))
    assert client.receive(wrong).failure is ClientFailure.BAD_REPLY

    client = proto.client()
    client.start()
    result = client.receive(b"junk")
    assert result.done and result.failure is ClientFailure.BAD_REPLY
    with pytest.raises(ProtocolError):
        client.receive(knock.auth)


def test_client_rejects_second_different_challenge(proto: SimpleNamespace) -> None:
    client, _session, challenge = _challenged(proto, ErrorPolicy.ALWAYS)
    client.receive(challenge)
    msg = proto.wire.parse(challenge)
    other = proto.wire.serialize(msg._replace(auth=bytes(32)))
    assert client.receive(other).failure is ClientFailure.BAD_REPLY


def test_client_only_starts_knock_or_revoke(proto: SimpleNamespace) -> None:
    with pytest.raises(ProtocolError):
        proto.client(Operation.RESPONSE)
    client = proto.client()
    client.start()
    with pytest.raises(ProtocolError):
        client.start()


def test_reprs_hold_no_secrets(proto: SimpleNamespace) -> None:
    client, session, challenge = _challenged(proto, ErrorPolicy.ALWAYS)
    token = proto.wire.parse(challenge).auth
    assert token.hex() not in repr(session).lower() and KEY.hex() not in repr(client).lower()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert addr.normalize(raw) == ipaddress.ip_address(expected)
