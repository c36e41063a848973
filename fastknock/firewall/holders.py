"""Who holds each kernel lease, so overlapping holders never cut each other short.

Design
------
* One kernel object (``leases.LeaseKey``: a set element or a jump rule) may be held by
  several knockers at once: two addresses of one /24 with ``ipv4-prefix: 24``, two users
  on one address, every knocker of a jump without ``saddr`` match. A holder is ``(user,
  knocker address)``, with its own deadline. The kernel object lives until the *latest*
  deadline of its holders: a knock sets the holder's deadline and re-sets the object to
  the latest one (so a re-knock whose deadline is earlier than another holder's does not
  shorten it); a revoke drops that holder only, and the object is removed when no holder
  is left, else re-set to the latest remaining deadline.
* A batch of requests is planned on a ``Draft`` (a copy of the touched keys' holders);
  ``Draft.changes`` gives one ``Change`` per touched key, and ``Draft.commit`` keeps the
  new holders of the keys whose change the kernel took (a refused change leaves its key
  as it was).
* A reload may change a resource's prefix or range (its keys' shape). A holder's next
  knock moves it from the old-shape keys it holds that overlap the new key (``overlaps``)
  to the new one; its revoke releases both (and the unknown holder of both). A new wide
  key that overlaps an old one in the same interval set replaces it whoever holds it:
  the kernel cannot hold both, and the current config wins (``Draft.superseded``).
* In memory only. After a restart (or for an element added by hand) a live kernel object
  has one *unknown* holder (``None``) until its kernel deadline; a revoke of the key drops
  it too (the revoker may be the one who knocked before the restart: a revoke must close
  what it asks to close), so the first revoke after a restart removes a shared prefix
  lease as fastknock did before holders existed; holders that knocked after the restart
  are tracked.
* The cap counts holders: ``count`` is the number of (key, holder) pairs, a key with no
  holder left (a jump rule waiting for the sweeper) counts 1. That bounds this table by
  ``max-nr-rules`` whatever the prefix (a /64 has 2**64 addresses), and kernel objects are
  never more than holders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastknock.addr import IPAddress
from fastknock.firewall.leases import Change, JumpLease, LeaseKey, PortLease, overlaps

__all__ = ["Claim", "Draft", "Holder", "Holdings"]

Holder = tuple[int, IPAddress] | None  # (user, knocker address); None: unknown (restart)


@dataclass(frozen=True, slots=True)
class Claim:
    """One holder's install (for ``timeout`` seconds) or revoke of one key; holder None
    with ``install=False``: expiry (drop the holders that are due; no holder left: remove)."""

    key: LeaseKey
    holder: Holder
    install: bool
    timeout: int = 0


@dataclass(slots=True)
class _Entry:
    deadline: float  # what the kernel holds: the element's expiry, the rule's comment
    holders: dict[Holder, float] = field(default_factory=dict)


class Holdings:
    """The live kernel objects and their holders. ``count`` and the indexes (wide keys,
    keys by holder) are kept as entries change (every batch asks for them)."""

    def __init__(self) -> None:
        self.entries: dict[LeaseKey, _Entry] = {}  # read here; changed by put/drop only
        self.wide: set[PortLease] = set()  # the keys of the interval sets
        self.held_by: dict[Holder, set[LeaseKey]] = {}
        self._count = 0

    def put(self, key: LeaseKey, entry: _Entry) -> None:
        self.drop(key)
        self.entries[key] = entry
        self._count += len(entry.holders) or 1
        if isinstance(key, PortLease) and key.wide:
            self.wide.add(key)
        for holder in entry.holders:
            self.held_by.setdefault(holder, set()).add(key)

    def drop(self, key: LeaseKey) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self._count -= len(entry.holders) or 1
        if isinstance(key, PortLease):
            self.wide.discard(key)
        for holder in entry.holders:
            keys = self.held_by[holder]
            keys.discard(key)
            if not keys:
                del self.held_by[holder]

    def deadlines(self) -> dict[LeaseKey, float]:
        return {key: e.deadline for key, e in self.entries.items()}

    def count(self) -> int:
        return self._count

    def holders(self, key: LeaseKey) -> dict[Holder, float]:
        entry = self.entries.get(key)
        return {} if entry is None else dict(entry.holders)

    def load(self, live: Iterable[tuple[LeaseKey, float]]) -> None:
        """What the kernel holds now (key, deadline): known holders of keys still there
        stay, new keys get the unknown holder, keys gone from the kernel are forgotten."""
        old = self.entries
        self.entries, self.wide, self.held_by, self._count = {}, set(), {}, 0
        for key, deadline in live:
            entry = old.get(key)
            if entry is not None and entry.holders:  # nft lists whole seconds left: the
                latest = max(deadline, max(entry.holders.values()))  # known end is exact
                self.put(key, _Entry(latest, entry.holders))
            else:
                self.put(key, _Entry(deadline, {None: deadline}))

    def prune(self, now: float) -> None:
        """Drop holders whose deadline passed, and port keys the kernel has expired (a
        jump rule stays, holder-less, until the sweeper removes it)."""
        for key, entry in list(self.entries.items()):
            if entry.deadline <= now and not isinstance(key, JumpLease):
                self.drop(key)
            elif any(d <= now for d in entry.holders.values()):
                self.put(
                    key, _Entry(entry.deadline, {h: d for h, d in entry.holders.items() if d > now})
                )

    def due_jumps(self, now: float) -> list[JumpLease]:
        return [
            k for k, e in self.entries.items() if isinstance(k, JumpLease) and e.deadline <= now
        ]


class Draft:
    """The holder changes of one batch, planned at ``now``."""

    def __init__(self, base: Holdings, now: float) -> None:
        self.base = base
        self.now = now
        self.touched: dict[LeaseKey, dict[Holder, float]] = {}
        self.proven: dict[LeaseKey, dict[IPAddress, int]] = {}
        self.superseded: list[LeaseKey] = []  # old-shape elements a new one replaced

    def _holders(self, key: LeaseKey) -> dict[Holder, float]:
        if key not in self.touched:
            self.touched[key] = self.base.holders(key)
        return self.touched[key]

    def new_entries(self, claims: Iterable[Claim]) -> int:
        """How much ``claims`` would add to ``Holdings.count``."""
        added = 0
        for c in claims:
            if not c.install:
                continue
            held = self.touched[c.key] if c.key in self.touched else self.base.holders(c.key)
            exists = c.key in self.touched or c.key in self.base.entries
            if c.holder not in held and (held or not exists):
                added += 1
        return added

    def _colliding(self, key: LeaseKey) -> list[PortLease]:
        """Live elements of ``key``'s interval set that overlap it but are not it: leases
        of a resource whose prefix or range a reload changed; the kernel refuses ``key``
        while one of them is there. O(live wide elements), for a key not yet live."""
        if not isinstance(key, PortLease) or not key.wide or key in self.base.entries:
            return []
        return [k for k in self.base.wide if k != key and overlaps(k, key)]

    def _own_old_shapes(self, c: Claim) -> list[LeaseKey]:
        """Other live keys that ``c``'s holder (for a revoke: or the unknown holder) holds
        and that overlap ``c.key``: the same lease in the shape of an earlier config."""
        mine = set(self.base.held_by.get(c.holder, ()))
        if not c.install:
            mine |= self.base.held_by.get(None, set())
        return [k for k in mine if k != c.key and overlaps(k, c.key)]

    def apply(self, claims: Iterable[Claim]) -> None:
        for c in claims:
            if c.holder is not None:  # the holder moves to the current shape, or leaves
                for old in self._own_old_shapes(c):
                    old_held = self._holders(old)
                    old_held.pop(c.holder, None)
                    if not c.install:
                        old_held.pop(None, None)
            for old in self._colliding(c.key) if c.install else ():
                old_held = self._holders(old)
                if old_held:  # the kernel holds one of the two: the current shape wins
                    self.superseded.append(old)
                old_held.clear()
            held = self._holders(c.key)
            if c.install:
                held[c.holder] = self.now + c.timeout
                if c.holder is not None:
                    self.proven.setdefault(c.key, {})[c.holder[1]] = c.timeout
            elif c.holder is None:  # expiry: drops only holders that are due
                for holder in [h for h, d in held.items() if d <= self.now]:
                    del held[holder]
            else:
                held.pop(c.holder, None)
                held.pop(None, None)  # the unknown holder may be this one (restart)

    def changes(self) -> list[Change]:
        """One change per touched key: re-set to its latest holder deadline, or remove."""
        out = []
        for key, held in self.touched.items():
            if not held:
                if isinstance(key, PortLease) and key.wide and key not in self.base.entries:
                    continue  # not in the kernel; an add+delete could hit an old shape
                out.append(Change(key, False))
                continue
            timeout = max(1, math.ceil(max(held.values()) - self.now))
            proven = tuple(self.proven.get(key, {}).items())
            out.append(Change(key, True, timeout, proven))
        return out

    def commit(self, failed: set[LeaseKey]) -> None:
        for key, held in self.touched.items():
            if key in failed:
                continue
            if held:
                self.base.put(key, _Entry(max(held.values()), dict(held)))
            else:
                self.base.drop(key)
