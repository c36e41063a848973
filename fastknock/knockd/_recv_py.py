"""Pure-Python reference of ``fastknock.knockd._recv``: the same ``Reader`` API and decisions.

Design
------
* Written separately from the Cython version (not a translation of it): ``recvfrom`` in a
  loop instead of ``recvmmsg``, a Python set of peer keys (built from the address tuple by
  ``peer.key_of``, where the C reader copies them out of the ``sockaddr``) instead of a C
  hash set, and the key ring's Python-level ``check`` instead of the C entry. It is what runs with
  ``FASTKNOCK_NO_EXTENSIONS=1`` and the oracle the differential tests compare against.
* Decisions, per datagram, in this order: not 56 bytes -> drop ("size"); the peer key was
  ``track()``ed (a live session) and not ``untrack()``ed since -> hand up; ``pass_rejects``
  -> hand up; a RESPONSE from a peer this reader did not answer in this or the previous
  epoch (``asked.AskedPeers``) -> drop ("response", before any crypto); a RESPONSE -> hand
  up if it answers one of the four candidate tokens
  (``challenges.token``, the one Python statement of the formula), else drop ("magic",
  "unknown_user" or "response"); with secrets set, the KNOCK answer cap
  (``replaycap.ReplayCap``) refuses it -> drop ("capped", before any MAC); else
  ``keyring.check``: fails -> drop counted by reason; passes -> recorded in the cap and
  its peer among the asked ones, and
  with a grant answered with the computed CHALLENGE here ("challenged"), without one
  handed up.
* ``drain`` reads at most ``budget * 64`` datagrams per call, like the C reader's
  ``budget`` recvmmsg batches, so a flood cannot starve the event loop.
* The rest (``rest_us``, off by default; the C reader's design notes say why): a drain
  that starts within ``busy_gap_us`` of the previous one's end and has emptied the socket
  with nothing handed up or answered sleeps ``rest_us`` once and reads what came
  meanwhile; never with ``drain(may_rest=False)``, nor for ``talk_us`` after a drain that
  handed up or answered something.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from fastknock.knockd.asked import AskedPeers
from fastknock.knockd.challenges import challenge_bytes, token
from fastknock.knockd.peer import KEY_SIZE, key_of
from fastknock.knockd.replaycap import SEED_SIZE, ReplayCap
from fastknock.message import MAGIC, MSG_SIZE, Operation, Reason

__all__ = ["COUNTERS", "Reader"]

log = logging.getLogger("fastknockd")

COUNTERS: tuple[str, ...] = (
    "dropped",
    "size",
    "magic",
    "operation",
    "unknown_user",
    "mac",
    "response",
    "handed_up",
    "live_hits",
    "batches",
    "errors",
    "challenged",
    "send_dropped",
    "capped",
    "cap_evicted",
)
_MAGIC = MAGIC.to_bytes(4, "big")
_RESPONSE = Operation.RESPONSE.to_bytes(4, "big")
BATCH = 64
MAX_REST_US = 1_000_000  # rest_us, busy_gap_us and talk_us: at most a second
_READ_SIZE = 64  # > 56: a datagram read whole as 56 bytes is exactly 56 bytes long
_REASON_FIELD = {
    Reason.SIZE: "size",
    Reason.MAGIC: "magic",
    Reason.OPERATION: "operation",
    Reason.UNKNOWN_USER: "unknown_user",
    Reason.MAC: "mac",
}


class Reader:
    """Drains a non-blocking UDP socket; see the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        keyring: object,
        handler: Callable[[bytes, bytes, tuple], None],
        *,
        pass_rejects: bool = False,
        allowed_ops: int = 0x21,
        budget: int = 16,
        cap_seed: bytes | None = None,
        rest_us: int = 0,
        busy_gap_us: int = 1000,
        talk_us: int = 0,
    ) -> None:
        if sock.fileno() < 0:
            raise ValueError("socket is closed")
        if budget < 1:
            raise ValueError("budget must be at least 1")
        if not all(0 <= t <= MAX_REST_US for t in (rest_us, busy_gap_us, talk_us)):
            raise ValueError(f"rest_us, busy_gap_us and talk_us are 0..{MAX_REST_US}")
        self._rest_ns = rest_us * 1000
        self._gap_ns = busy_gap_us * 1000
        self._talk_ns = talk_us * 1000
        self._last_end = self._talk_until = -(1 << 62)
        if keyring is None:
            raise TypeError("keyring must not be None")
        self._sock = sock
        self._ring = keyring
        self._handler = handler
        self._live: set[bytes] = set()
        self._pass_rejects = pass_rejects
        self._allowed_ops = allowed_ops
        self._budget = budget
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._secrets: tuple[object, int, object] | None = None
        self._grants: frozenset[int] = frozenset()
        self._caps = ReplayCap(os.urandom(SEED_SIZE) if cap_seed is None else cap_seed)
        self._asked = AskedPeers()

    def configure(self, keyring: object, pass_rejects: bool) -> None:
        if keyring is None:
            raise TypeError("keyring must not be None")
        if self._pass_rejects and not pass_rejects:  # Python answered KNOCKs meanwhile
            self._asked.forget()
        self._ring = keyring
        self._pass_rejects = pass_rejects

    def set_secrets(self, current: object, epoch: int, previous: object) -> None:
        if current is None:
            raise TypeError("current must not be None")
        old = self._secrets
        if old is None or current is not old[0] or epoch != old[1]:
            shift = old is not None and previous is old[0] and epoch == old[1] + 1
            self._asked.rotate(previous is not None and shift)
        self._secrets = (current, epoch, previous)

    def set_grants(self, grants: object) -> None:
        self._grants = frozenset(int(g) for g in grants)  # type: ignore[attr-defined]

    @property
    def keyring(self) -> object:
        return self._ring

    @property
    def tracked(self) -> int:
        return len(self._live)

    def track(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a peer key is {KEY_SIZE} bytes, not {len(key)}")
        self._live.add(key)

    def untrack(self, key: bytes) -> None:
        self._live.discard(key)

    def drain(self, may_rest: bool = True) -> int:
        counts = self._counts
        live = self._live
        check = self._ring.check  # type: ignore[attr-defined]
        total = 0
        now = time.monotonic_ns()
        rest = (
            may_rest
            and self._rest_ns
            and now - self._last_end < self._gap_ns
            and now >= self._talk_until
        )
        handed, challenged = counts["handed_up"], counts["challenged"]
        for _ in range(self._budget):
            got = 0
            while got < BATCH:
                try:
                    data, addr = self._sock.recvfrom(_READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    counts["errors"] += 1
                    break
                got += 1
                if len(data) != MSG_SIZE:
                    counts["dropped"] += 1
                    counts["size"] += 1
                    continue
                key = key_of(addr)
                if key in live:
                    counts["live_hits"] += 1
                elif not self._pass_rejects:
                    verdict = self._decide(data, key, addr, check)
                    if verdict == "challenged":
                        counts["challenged"] += 1
                        continue
                    if verdict is not None:
                        counts["dropped"] += 1
                        counts[verdict] += 1
                        continue
                counts["handed_up"] += 1
                try:
                    self._handler(data, key, addr)
                except Exception:
                    counts["errors"] += 1
                    log.exception("UDP datagram handler failed")
            if got:
                counts["batches"] += 1
            total += got
            if got < BATCH:
                if (
                    rest
                    and got
                    and counts["handed_up"] == handed
                    and counts["challenged"] == challenged
                ):
                    rest = False
                    time.sleep(self._rest_ns / 1e9)
                    continue
                break
        self._last_end = time.monotonic_ns()
        if counts["handed_up"] != handed or counts["challenged"] != challenged:
            self._talk_until = self._last_end + self._talk_ns
        return total

    def _decide(self, data: bytes, key: bytes, addr: tuple, check: object) -> str | None:
        """None: hand up; "challenged": answered here; else the reason field to count."""
        if data[4:8] == _RESPONSE:
            return self._response(data, key)
        if self._secrets is not None and self._caps.refuses(data[24:56], key, self._secrets[1]):
            return "capped"
        reason, msg = check(data, self._allowed_ops)  # type: ignore[operator]
        if reason != Reason.OK:
            return _REASON_FIELD[Reason(reason)]
        if self._secrets is None:
            return None
        current, epoch, _ = self._secrets
        self._caps.record(data[24:56], key, epoch)
        self._asked.add(key)
        if (msg.user << 32 | msg.resource) not in self._grants:
            return None
        tok = token(current, epoch, msg.operation, msg.user, msg.resource, key)  # type: ignore[arg-type]
        try:
            self._sock.sendto(challenge_bytes(tok, msg.user, msg.resource), addr)
        except OSError:
            self._counts["send_dropped"] += 1
        return "challenged"

    def _response(self, data: bytes, key: bytes) -> str | None:
        if data[:4] != _MAGIC:
            return "magic"
        user = int.from_bytes(data[8:12], "big")
        resource = int.from_bytes(data[12:16], "big")
        user_key = self._ring.get(user)  # type: ignore[attr-defined]
        if user_key is None:
            return "unknown_user"
        if self._secrets is None or not self._asked.admits(key):
            return "response"
        current, epoch, previous = self._secrets
        salt, auth = data[16:24], data[24:56]
        ok = False
        for secret, e in ((current, epoch), (previous, epoch - 1)):
            for op in (Operation.KNOCK, Operation.REVOKE):
                tok = token(secret or current, e, op, user, resource, key)  # type: ignore[arg-type]
                good = user_key.verify(Operation.RESPONSE, user, resource, salt, auth, tok)
                ok |= bool(good) and secret is not None
        return None if ok else "response"

    def take(self) -> tuple[int, ...]:
        self._counts["cap_evicted"] = self._caps.evicted
        self._caps.evicted = 0
        out = tuple(self._counts[name] for name in COUNTERS)
        self._counts = dict.fromkeys(COUNTERS, 0)
        return out

    def __repr__(self) -> str:
        return f"Reader(fd={self._sock.fileno()}, py)"
