"""Stateless UDP challenges: a CHALLENGE token is computed, not stored (sans-I/O).

Why: a KNOCK is not replay-protected (the seeds say so); if every copy of a sniffed KNOCK
from a new (address, port) held a session until the control timeout, a few thousand
spoofed copies per second would fill every slot and lock out everyone. So on UDP the
server keeps *nothing* for a KNOCK: the token it sends is

    token = HMAC(secret_e, OP || USER || RESOURCE || EPOCH(8) || ADDR(16) || PORT(2) || 0*14)

i.e. ``HmacKey(secret_e).sign(op, user, resource, salt=epoch, challenge=peer key + zeros)``,
the same 52-byte HMAC input the message MAC uses (so the C reader computes it with the
pre-absorbed ``sign_raw``). ``secret_e`` is 32 bytes from the OS CSPRNG, fresh for every
epoch; an epoch lasts one control timeout, and a RESPONSE is checked against the current
and the previous epoch, so a token is valid for at least one and at most two control
timeouts. The CHALLENGE's SALT is ``token[:8]`` (the token is public in the CHALLENGE
anyway): a retransmitted KNOCK in the same epoch gets the very same CHALLENGE bytes.

A RESPONSE from a peer without state is checked against the candidate tokens -- both
epochs, KNOCK and REVOKE (a RESPONSE does not say which): at most four HMACs for the
tokens and four MAC verifications, all evaluated (constant-time compares, no early exit).
Only a match creates state (``Endpoint``), and then the session is full-auth.

Replay: a matched RESPONSE is recorded (its token and its AUTH); the same RESPONSE again is
refused, so a captured one never causes a second firewall change. Another RESPONSE for the
same token has a MAC of its own, which only a key holder can make: it is a new knock by
the same user from the same address *and port* within the window (a client, or a NAT,
reusing a source port), and is accepted -- at most ``PER_TOKEN`` times per token. (Refusing
it would fail such knocks at random: the birthday odds of two of 50 knocks from one
address sharing an ephemeral port are about 4 %.) The record is bounded (``max_used``) and
forgets a token when its epoch leaves the window; when it is full the secrets rotate early
(outstanding tokens die: in-flight clients fail once and knock again) rather than refuse
or forget. The secrets are never stored, so tokens never repeat across restarts.

Wire-compatible: the client cannot tell a computed token from a random one (both are 32
bytes it echoes under its own MAC), and letmein's client keeps no state beyond it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from fastknock.mac import HmacKey
from fastknock.message import Message, Operation
from fastknock.protocol import Rand

SECRET_SIZE = 32
DEFAULT_MAX_USED = 4096
PER_TOKEN = 4  # distinct RESPONSEs (fresh MACs) accepted for one token
_OPS = (Operation.KNOCK, Operation.REVOKE)
_PAD = bytes(14)


def token(secret: HmacKey, epoch: int, op: int, user: int, resource: int, peer: bytes) -> bytes:
    """The token of ``peer`` (an 18-byte ``knockd.peer`` key) for this epoch's secret."""
    return secret.sign(op, user, resource, struct.pack(">q", epoch), peer + _PAD)


def challenge_bytes(tok: bytes, user: int, resource: int) -> bytes:
    """The CHALLENGE message carrying ``tok`` (SALT = ``tok[:8]``: deterministic)."""
    from fastknock import wire

    return wire.pack(Operation.CHALLENGE, user, resource, tok[:8], tok)


class Challenger:
    """Epoch secrets, token computation and the used-token record; see the module header."""

    def __init__(
        self,
        rand: Rand,
        epoch_seconds: float,
        now: float,
        max_used: int = DEFAULT_MAX_USED,
        on_rotate: Callable[[], None] | None = None,
    ) -> None:
        if epoch_seconds <= 0:
            raise ValueError("epoch_seconds must be positive")
        self._rand = rand
        self.epoch_seconds = epoch_seconds
        self.max_used = max_used
        self._on_rotate = on_rotate
        self.rotations = 0  # early rotations (a full used-token record)
        self._start(now)

    def _start(self, now: float) -> None:
        self._base = now
        self.epoch = 0
        self.current = HmacKey(self._rand(SECRET_SIZE))
        self.previous: HmacKey | None = None
        self._used: dict[bytes, int] = {}  # token + AUTH of a spent RESPONSE -> its epoch
        self._per_token: dict[bytes, int] = {}  # token -> RESPONSEs spent on it

    @property
    def next_rotation(self) -> float:
        return self._base + (self.epoch + 1) * self.epoch_seconds

    def advance(self, now: float) -> None:
        """Rotate the secrets if an epoch boundary passed (call with every ``now``)."""
        if now < self.next_rotation:
            return
        passed = int((now - self._base) // self.epoch_seconds) - self.epoch
        self.previous = self.current if passed == 1 else None
        self.current = HmacKey(self._rand(SECRET_SIZE))
        self.epoch += passed
        oldest = self.epoch - 1
        self._used = {t: e for t, e in self._used.items() if e >= oldest}
        self._per_token = {}
        for t in self._used:
            self._per_token[t[:32]] = self._per_token.get(t[:32], 0) + 1
        if self._on_rotate is not None:
            self._on_rotate()

    def rotate_now(self, now: float) -> None:
        """Early rotation: every outstanding token dies, the record starts empty."""
        self.rotations += 1
        self._start(now)
        if self._on_rotate is not None:
            self._on_rotate()

    def challenge(self, msg: Message, peer: bytes, now: float) -> bytes:
        """The CHALLENGE for a KNOCK/REVOKE ``msg`` that passed server rules 1-3."""
        self.advance(now)
        tok = token(self.current, self.epoch, msg.operation, msg.user, msg.resource, peer)
        return challenge_bytes(tok, msg.user, msg.resource)

    def match(
        self, msg: Message, user_key: HmacKey, peer: bytes, now: float
    ) -> tuple[Operation, bytes, int] | None:
        """The (operation, token, epoch) a RESPONSE ``msg`` answers, or None. Every
        candidate is computed and verified (constant-time compares, no early exit)."""
        self.advance(now)
        found = b""
        found_op = found_epoch = 0
        for secret, epoch in ((self.current, self.epoch), (self.previous, self.epoch - 1)):
            key = secret if secret is not None else self.current  # same work when absent
            for op in _OPS:
                tok = token(key, epoch, op, msg.user, msg.resource, peer)
                good = user_key.verify_message(msg, tok) and secret is not None
                if good:
                    found, found_op, found_epoch = tok, op, epoch
        if not found:
            return None
        return Operation(found_op), found, found_epoch

    def consume(self, tok: bytes, epoch: int, now: float, auth: bytes) -> bool:
        """Record the RESPONSE (``tok`` and its ``auth``) as spent; False if this very
        RESPONSE was spent before (a replay) or its token has had ``PER_TOKEN`` already."""
        entry = tok + auth
        if entry in self._used or self._per_token.get(tok, 0) >= PER_TOKEN:
            return False
        if len(self._used) >= self.max_used:
            # Full: new secrets. This token's secret is gone with the rest, so it can never
            # match again and needs no record; every other outstanding token dies.
            self.rotate_now(now)
            return True
        self._used[entry] = epoch
        self._per_token[tok] = self._per_token.get(tok, 0) + 1
        return True

    @property
    def used(self) -> int:
        return len(self._used)

    def secrets(self) -> tuple[HmacKey, int, HmacKey | None]:
        """(current secret, its epoch, previous secret or None): for the C reader."""
        return self.current, self.epoch, self.previous


__all__ = ["DEFAULT_MAX_USED", "SECRET_SIZE", "Challenger", "challenge_bytes", "token"]
