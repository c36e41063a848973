"""Session budgets of fastknockd: caps in all, per source and per site, so that nobody
without a key can take the slots that key holders need.

A *source* is an IPv4 address or an IPv6 /56; a *site* is an IPv6 /48 (one allocation
holds 256 /56s), so one site cannot dodge the per-source cap by spreading over its /56s.
IPv4 has no site level (a /24 is often many unrelated hosts behind CGNAT).

The endpoint keeps three budgets (``Budgets``), each a ``Limits``:

* ``udp``: UDP sessions. With stateless challenges they exist only after a RESPONSE proved
  the key, while the firewall works: a KNOCK, replayed from any number of addresses,
  takes nothing here.
* ``preauth``: TCP connections that have not proved the key yet (no valid RESPONSE). Until
  a valid first message they have a short deadline (``preauth_timeout``, 1 s), then the
  control timeout; the budget is small and their own, and when it is full the *oldest*
  pre-auth connection is closed to make room (``Endpoint``), so idle or slow peers -- or
  a captured KNOCK replayed over TCP -- cannot hold the door shut.
* ``tcp``: TCP sessions that proved the key (a valid RESPONSE), while the firewall works.

Remaining worst case, stated honestly. An attacker with N real addresses and no key:

* UDP: cannot hold any state (see ``challenges``); only raw bandwidth and CPU (the C reader
  and the in-kernel pre-filter's job).
* TCP: holds at most min(4 N, ``preauth``'s total) pre-auth connections (per-source cap 4,
  per-/48 cap 16 by default), each for at most ``preauth_timeout`` (idle) or the control
  timeout (a replayed KNOCK). Once the pre-auth budget is full every new connection
  evicts the oldest one, so a key holder's TCP knock fails only if the attacker opens a
  whole budget's worth (128) of connections during the key holder's two round trips; the
  client then retries or uses UDP. The ``tcp`` budget (``-n``, ``-N``) holds only sessions
  that proved the key.
* Per source, an attacker can always fill *its own* source's caps: a key holder behind the
  same IPv4 address (or /56, or /48) as the attacker shares them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

_MAPPED = bytes(10) + b"\xff\xff"
SOURCE_PREFIX6 = 56
SITE_PREFIX6 = 48


def source_of(key: bytes) -> bytes:
    """What the per-source caps count: an IPv4 address, or the IPv6 /56 it lies in."""
    return key[:16] if key[:12] == _MAPPED else key[: SOURCE_PREFIX6 // 8]


def site_of(key: bytes) -> bytes | None:
    """What the per-site caps count: the IPv6 /48 (None for IPv4)."""
    return None if key[:12] == _MAPPED else key[: SITE_PREFIX6 // 8]


def describe(prefix: bytes) -> str:
    """A source or site key as text, for the operator's log line."""
    if len(prefix) == 16 and prefix[:12] == _MAPPED:
        return str(ipaddress.IPv4Address(prefix[12:]))
    bits = len(prefix) * 8
    return str(ipaddress.IPv6Network((prefix.ljust(16, b"\0"), bits)))


class Limits:
    """Counts entries in all, per source and per site; refuses past any cap."""

    def __init__(self, max_total: int, max_per_source: int, max_per_site: int = 0) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.max_per_site = max_per_site or 4 * max_per_source
        self.total = 0
        self._per_source: dict[bytes, int] = {}
        self._per_site: dict[bytes, int] = {}

    def refusal(self, key: bytes) -> str | None:
        """Which cap a new entry for the peer ``key`` would break ("source", "site", then
        "total": a caller that evicts on "total" knows the entry then fits), or None."""
        if self._per_source.get(source_of(key), 0) >= self.max_per_source:
            return "source"
        site = site_of(key)
        if site is not None and self._per_site.get(site, 0) >= self.max_per_site:
            return "site"
        if self.total >= self.max_total:
            return "total"
        return None

    def acquire(self, key: bytes) -> bool:
        if self.refusal(key) is not None:
            return False
        source = source_of(key)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        site = site_of(key)
        if site is not None:
            self._per_site[site] = self._per_site.get(site, 0) + 1
        self.total += 1
        return True

    def release(self, key: bytes) -> None:
        _drop(self._per_source, source_of(key))
        site = site_of(key)
        if site is not None:
            _drop(self._per_site, site)
        self.total -= 1

    @property
    def sources(self) -> int:
        return len(self._per_source)

    def top_source(self) -> bytes | None:
        """The source holding the most entries (for the operator's warning)."""
        if not self._per_source:
            return None
        return max(self._per_source.items(), key=lambda item: item[1])[0]


def _drop(counts: dict[bytes, int], key: bytes) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


@dataclass
class Budgets:
    """The endpoint's three budgets and the pre-auth deadline; see the module header."""

    udp: Limits
    tcp: Limits
    preauth: Limits
    preauth_timeout: float = 1.0

    @property
    def active(self) -> int:
        """Sessions and pre-auth connections in all (the ``sessions_active`` gauge)."""
        return self.udp.total + self.tcp.total + self.preauth.total

    @classmethod
    def default(
        cls,
        max_sessions: int = 64,
        max_per_source: int = 8,
        preauth_max: int = 128,
        preauth_per_source: int = 4,
        preauth_timeout: float = 1.0,
        max_per_site: int = 0,
    ) -> Budgets:
        return cls(
            udp=Limits(max_sessions, max_per_source, max_per_site),
            tcp=Limits(max_sessions, max_per_source, max_per_site),
            preauth=Limits(preauth_max, preauth_per_source),
            preauth_timeout=preauth_timeout,
        )


__all__ = ["Budgets", "Limits", "describe", "site_of", "source_of"]
