"""The KNOCK answer cap: each distinct KNOCK is answered for a few peers per epoch (sans-I/O).

Why: a KNOCK is not replay-protected, and with stateless challenges (``challenges.py``) a
sniffed KNOCK replayed from thousands of spoofed addresses holds no state, but every copy
still cost a MAC check, a token HMAC and a CHALLENGE sent. This table makes a replay cost a
lookup: a KNOCK/REVOKE that passed the MAC is recorded with the peers it was answered for,
and a copy of it from yet another peer, once ``PEERS`` peers were answered in this epoch, is
dropped *before* the MAC check (counter ``knock-replay-capped``).

* **Key.** The KNOCK's AUTH (its MAC, 32 bytes). Only a datagram that passed the MAC is
  recorded, so junk cannot fill the table; and the MAC covers every other byte but the fixed
  magic, so a datagram with a recorded AUTH is that very KNOCK or fails the MAC anyway: the
  lookup may drop it first without dropping anything the MAC check would have passed.
* **What is counted.** Distinct peers (address, port): a peer that was answered is always
  answered again in the epoch (a client's retransmission, byte-identical, gets its
  deterministic CHALLENGE), up to ``ANSWERS`` answers in all per KNOCK and epoch (our client
  sends at most 5 copies of a KNOCK; the bound keeps a flood that spoofs an answered peer
  from costing a MAC each). A new peer is answered while fewer than ``PEERS`` were.
* **Epochs.** An entry counts for the epoch of the challenge secrets it was answered in (the
  CHALLENGE changes with the epoch); an entry of another epoch is free space, so the cap
  forgets a KNOCK when its epoch ends, and a replayed KNOCK costs at most ``PEERS`` answers
  (plus ``ANSWERS`` in all) per epoch and reader.
* **Bounded.** ``SETS`` sets of ``WAYS`` entries, allocated once (4,096 entries, about 800
  kB in C). The set is a keyed mix of the AUTH with a random per-reader seed, so nobody who
  lacks the seed can tell which set a KNOCK falls in. A new entry takes an empty or stale
  way, else evicts the oldest entry of its set (counter ``knock_cap_evicted``).
* **What an eviction can do.** It never refuses anyone: it only forgets, so an evicted KNOCK
  is answered afresh (and its peer list starts over). Evicting a chosen entry takes
  ``WAYS`` newer valid KNOCKs in its set, and without the seed about ``SETS * WAYS``
  (the whole table) distinct valid KNOCKs in one epoch: a key holder, or somebody who
  sniffed thousands of distinct KNOCKs (they carry no time; old ones still pass the MAC).
  Such a one can churn the table and make their replays cost what every replay cost before
  the cap (a MAC, an HMAC and a CHALLENGE each), no more.
* **The race.** An on-path attacker who sees a legitimate KNOCK and gets ``PEERS`` spoofed
  copies to the server *before* it arrives makes the server ignore that KNOCK from its real
  sender in this epoch (afterwards the real sender, answered first, keeps its answers).
  The client's next knock has a new SALT, so the attacker must race every knock; one who
  can do that can also drop or outpace the client's datagrams. Over TCP (the client falls
  back when UDP gets no answer) the cap does not apply: the handshake proves the address.

The C reader (``_recv.pyx`` with ``_replay.pxd``) implements the same table with the same
index function and eviction order, for the differential tests; this module serves the
pure-Python reader and the endpoint (the ``DatagramProtocol`` path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SETS = 512  # a power of two
WAYS = 8
PEERS = 8  # distinct peers answered per KNOCK and epoch
ANSWERS = 32  # answers in all per KNOCK and epoch, retransmissions included
SEED_SIZE = 16
AUTH_SIZE = 32
_M = (1 << 64) - 1


def _fmix(x: int) -> int:
    """MurmurHash3's 64-bit finalizer (a bijection with full avalanche)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M
    return x ^ (x >> 33)


def set_index(seed: bytes, auth: bytes, sets: int = SETS) -> int:
    """The set of ``auth`` under ``seed``: fmix(fmix(a0 ^ k0) ^ a1 ^ k1) mod sets, with
    a0, a1 the first two little-endian 64-bit words of the AUTH and k0, k1 of the seed."""
    k0, k1 = int.from_bytes(seed[:8], "little"), int.from_bytes(seed[8:16], "little")
    a0, a1 = int.from_bytes(auth[:8], "little"), int.from_bytes(auth[8:16], "little")
    return _fmix(_fmix(a0 ^ k0) ^ a1 ^ k1) & (sets - 1)


@dataclass(slots=True)
class _Entry:
    auth: bytes
    epoch: int
    seq: int  # insertion order (the oldest of a full set is evicted)
    peers: list[bytes] = field(default_factory=list)
    answers: int = 0


class ReplayCap:
    """The table of one reader (or endpoint); see the module docstring."""

    def __init__(self, seed: bytes, sets: int = SETS) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"the seed is {SEED_SIZE} bytes")
        if sets < 1 or sets & (sets - 1):
            raise ValueError("sets must be a power of two")
        self._seed = bytes(seed)
        self._sets: list[list[_Entry]] = [[] for _ in range(sets)]
        self._seq = 0
        self.evicted = 0

    def _find(self, auth: bytes, epoch: int) -> _Entry | None:
        for entry in self._sets[set_index(self._seed, auth, len(self._sets))]:
            if entry.epoch == epoch and entry.auth == auth:
                return entry
        return None

    def refuses(self, auth: bytes, peer: bytes, epoch: int) -> bool:
        """Before the MAC check: True if this KNOCK (its ``auth``) must not be answered for
        ``peer`` (an 18-byte peer key) in ``epoch``."""
        entry = self._find(auth, epoch)
        if entry is None:
            return False
        if entry.answers >= ANSWERS:
            return True
        return peer not in entry.peers and len(entry.peers) >= PEERS

    def record(self, auth: bytes, peer: bytes, epoch: int) -> bool:
        """After the MAC check passed (and ``refuses`` said no): one answer for ``peer``.
        True if a new entry evicted another (also counted in ``evicted``)."""
        entry = self._find(auth, epoch)
        evicted = self.evicted
        if entry is None:
            entry = self._insert(auth, epoch)
        entry.answers += 1
        if peer not in entry.peers and len(entry.peers) < PEERS:
            entry.peers.append(peer)
        return self.evicted != evicted

    def _insert(self, auth: bytes, epoch: int) -> _Entry:
        ways = self._sets[set_index(self._seed, auth, len(self._sets))]
        self._seq += 1
        entry = _Entry(bytes(auth), epoch, self._seq)
        for i, old in enumerate(ways):  # the first stale way (another epoch) is free
            if old.epoch != epoch:
                ways[i] = entry
                return entry
        if len(ways) < WAYS:
            ways.append(entry)
            return entry
        oldest = min(range(WAYS), key=lambda i: ways[i].seq)
        ways[oldest] = entry
        self.evicted += 1
        return entry

    def entries(self, epoch: int) -> int:
        """Entries of ``epoch`` (for tests: bounded by ``SETS * WAYS``)."""
        return sum(1 for ways in self._sets for e in ways if e.epoch == epoch)


__all__ = ["ANSWERS", "PEERS", "SEED_SIZE", "SETS", "WAYS", "ReplayCap", "set_index"]
