"""fastknockd's sans-I/O endpoint: every control session, its caps, queue and deadline.

Shaped like aioquic's connection object. The I/O layer (``control.py``: asyncio transports,
the batched C reader) feeds it and then carries out what it asks for:

  feed:   receive_datagram(data, key, addr, now)            UDP, keyed by ``peer`` key
          tcp_connected(conn, key, now) -> bool / tcp_received(conn, data, now) / tcp_closed(conn)
          firewall_done(ticket, ok, now)                     the answer to an AskFirewall
          handle_timer(now)                                  when now >= next_timer()
  drain:  actions() -> [SendDatagram | StreamWrite | StreamClose | AskFirewall]
          next_timer() -> float | None
  other:  reload(settings), watch(callback), shutdown(), counters, limits

No sockets, no clock, no tasks in here: ``now`` is passed in, randomness is the core's
injected ``rand``. The protocol rules themselves live in ``fastknock.protocol``; this object
owns what is per peer: one session per UDP peer (address, port) and one per TCP connection,
the caps (``limits.Limits``: sessions in all and per source, checked before any session
exists; past a cap the newest is refused, never an established one), at most ``MAX_QUEUED``
messages waiting per session while its firewall request is in flight, and one deadline per
session (a heap with lazy deletion; ``next_timer`` is its earliest live entry).

``watch(callback)`` tells the batched reader, synchronously, when a UDP session starts
(``callback(key, True)``) and ends (``False``): the reader's C set of live peers is exactly
this endpoint's, with no shared dict and no address strings to agree on.

Outcomes are counted (``counters.Count``) and logged here, in one place: successes at info
level, rejections at debug level only (a flood must not flood the journal).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastknock.knockd.counters import Count, Counters
from fastknock.knockd.limits import Limits
from fastknock.knockd.peer import peer_of, source_of
from fastknock.message import MSG_SIZE, Operation
from fastknock.protocol import (
    Event,
    FirewallRequest,
    Rand,
    Send,
    ServerCore,
    ServerSession,
    ServerSettings,
    SessionClosed,
)

log = logging.getLogger("fastknockd")

MAX_QUEUED = 4


# -- actions for the I/O layer ---------------------------------------------------------------


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
Watcher = Callable[[bytes, bool], None]


class _Slot:
    """One live session: a UDP peer, or a TCP connection (``conn`` set)."""

    __slots__ = ("key", "addr", "conn", "source", "session", "queue", "busy", "deadline",
                 "done", "gone", "buf")  # fmt: skip

    def __init__(self, key: bytes, addr: object, conn: int | None, source: bytes) -> None:
        self.key = key
        self.addr = addr
        self.conn = conn
        self.source = source
        self.session: ServerSession | None = None
        self.queue: list[bytes] = []
        self.busy = False  # a firewall request is in flight
        self.deadline = 0.0
        self.done = False  # forgotten: out of the tables, its slot in the caps released
        self.gone = False  # TCP: the connection is closed; nothing more can be written
        self.buf = b""  # TCP: bytes of an incomplete message


class Endpoint:
    """All control sessions of one fastknockd process (or worker); see the module docstring."""

    def __init__(self, settings: ServerSettings, limits: Limits, rand: Rand) -> None:
        self._rand = rand
        self.core = ServerCore(settings, rand)
        self.limits = limits
        self.counters = Counters()
        self._udp: dict[bytes, _Slot] = {}
        self._tcp: dict[int, _Slot] = {}
        self._timers: list[tuple[float, int, _Slot]] = []
        self._seq = itertools.count()
        self._out: list[Action] = []
        self._watchers: list[Watcher] = []

    # -- configuration ---------------------------------------------------------------------

    @property
    def settings(self) -> ServerSettings:
        return self.core.settings

    @property
    def timeout(self) -> float:
        return self.core.settings.timeout

    def reload(self, settings: ServerSettings) -> None:
        """New sessions use ``settings``; sessions in flight finish on the old ones."""
        self.core = ServerCore(settings, self._rand)

    def watch(self, callback: Watcher) -> None:
        self._watchers.append(callback)

    @property
    def udp_peers(self) -> int:
        return len(self._udp)

    @property
    def tcp_connections(self) -> int:
        return len(self._tcp)

    def sessions(self) -> list[_Slot]:
        """The live sessions (for tests and introspection; read-only by convention)."""
        return [*self._udp.values(), *self._tcp.values()]

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # -- UDP ------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, key: bytes, addr: object, now: float) -> None:
        counters = self.counters
        counters[Count.RECEIVED] += 1
        if len(data) != MSG_SIZE:
            counters[Count.OUTCOME_SIZE] += 1
            return
        slot = self._udp.get(key)
        if slot is not None:
            self._feed(slot, data, now)
            return
        source = source_of(key)
        if not self.limits.acquire(source):
            counters[Count.DROPPED_LIMITS] += 1
            return
        session, events = self.core.start(data, peer_of(key), now)
        if session is None:
            self.limits.release(source)
            for event in events:
                if isinstance(event, Send):
                    self._out.append(SendDatagram(event.data, addr))
                elif isinstance(event, SessionClosed):
                    self._ended(event, key)
            return
        slot = _Slot(key, addr, None, source)
        slot.session = session
        self._udp[key] = slot
        counters[Count.SESSIONS] += 1
        for watcher in self._watchers:
            watcher(key, True)
        self._act(slot, events)

    # -- TCP ------------------------------------------------------------------------------

    def tcp_connected(self, conn: int, key: bytes, now: float) -> bool:
        """A new connection; False: refused (caps), the I/O layer aborts it."""
        self.counters[Count.TCP_CONNECTIONS] += 1
        source = source_of(key)
        if not self.limits.acquire(source):
            self.counters[Count.DROPPED_LIMITS] += 1
            return False
        slot = _Slot(key, None, conn, source)
        self._tcp[conn] = slot
        self._arm(slot, now + self.timeout)
        return True

    def tcp_received(self, conn: int, data: bytes, now: float) -> None:
        slot = self._tcp.get(conn)
        if slot is None:
            return
        slot.buf += data
        while len(slot.buf) >= MSG_SIZE and not slot.done:
            msg, slot.buf = slot.buf[:MSG_SIZE], slot.buf[MSG_SIZE:]
            self.counters[Count.RECEIVED] += 1
            if slot.session is not None:
                self._feed(slot, msg, now)
                continue
            session, events = self.core.start(msg, peer_of(slot.key), now)
            slot.session = session
            self._act(slot, events)
        if len(slot.buf) > MSG_SIZE * MAX_QUEUED:  # a peer that floods a busy session
            slot.buf = slot.buf[-MSG_SIZE * MAX_QUEUED :]

    def tcp_closed(self, conn: int) -> None:
        """The connection broke off or the peer closed it."""
        slot = self._tcp.get(conn)
        if slot is None:
            return
        slot.gone = True
        if slot.busy:
            return  # the firewall's answer ends the session, and it is counted then
        self.counters[Count.TCP_ABORTED] += 1
        self._forget(slot)

    # -- the firewall and timers ------------------------------------------------------------

    def firewall_done(self, ticket: object, ok: bool, now: float) -> None:
        slot = ticket
        assert isinstance(slot, _Slot)
        slot.busy = False
        if not ok:
            self.counters[Count.FIREWALL_ERRORS] += 1
        session = slot.session
        if session is None or session.closed:  # timed out meanwhile; the peer was answered
            if not slot.done and slot.gone:
                self._forget(slot)
            return
        self._act(slot, session.firewall_done(ok, now))
        queued, slot.queue = slot.queue, []
        for data in queued:
            if session.closed or slot.busy:
                break
            self._act(slot, session.receive(data, now))

    def next_timer(self) -> float | None:
        timers = self._timers
        while timers and (timers[0][2].done or timers[0][0] != timers[0][2].deadline):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, slot = heapq.heappop(timers)
            if slot.done or deadline != slot.deadline:
                continue
            if slot.session is None:  # TCP: no complete first message in time
                self._act(slot, self.core.silent_peer())
            else:
                self._act(slot, slot.session.timeout(max(now, slot.session.deadline)))

    def shutdown(self) -> None:
        """fastknockd is stopping: forget every session (TCP ones count as cancelled)."""
        for slot in [*self._udp.values(), *self._tcp.values()]:
            if slot.conn is not None:
                self.counters[Count.TCP_CANCELLED] += 1
                self._out.append(StreamClose(slot.conn))
            self._forget(slot)

    # -- the one event interpreter --------------------------------------------------------

    def _feed(self, slot: _Slot, data: bytes, now: float) -> None:
        if slot.busy:
            if len(slot.queue) < MAX_QUEUED:
                slot.queue.append(data)
            else:
                self.counters[Count.DROPPED_QUEUE] += 1
            return
        assert slot.session is not None
        self._act(slot, slot.session.receive(data, now))

    def _act(self, slot: _Slot, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Send):
                if slot.conn is None:
                    self._out.append(SendDatagram(event.data, slot.addr))
                elif not slot.gone:
                    self._out.append(StreamWrite(slot.conn, event.data))
            elif isinstance(event, FirewallRequest):
                slot.busy = True
                assert slot.session is not None
                self._out.append(AskFirewall(slot, event, slot.session.deadline))
            elif isinstance(event, SessionClosed):
                if slot.conn is not None and not slot.gone:
                    self._out.append(StreamClose(slot.conn))
                self._forget(slot)
                self._ended(event, slot.key)
                return
        if slot.session is not None and slot.session.deadline != slot.deadline:
            self._arm(slot, slot.session.deadline)

    def _arm(self, slot: _Slot, deadline: float) -> None:
        slot.deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), slot))

    def _forget(self, slot: _Slot) -> None:
        if slot.done:
            return
        slot.done = True
        if slot.conn is None:
            del self._udp[slot.key]
            for watcher in self._watchers:
                watcher(slot.key, False)
        else:
            del self._tcp[slot.conn]
        self.limits.release(slot.source)

    def _ended(self, end: SessionClosed, key: bytes) -> None:
        counters = self.counters
        counters[Count.for_outcome(end.outcome)] += 1
        if end.ok:
            knock = end.operation is Operation.KNOCK
            counters[Count.KNOCKED if knock else Count.REVOKED] += 1
            log.info(
                "[%s] resource %08X %s by user %08X",
                peer_of(key),
                end.resource,
                "knocked" if knock else "revoked",
                end.user,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[%s] rejected (%s) user %08X resource %08X",
                peer_of(key),
                end.outcome.value,
                end.user,
                end.resource,
            )


__all__ = [
    "MAX_QUEUED",
    "Action",
    "AskFirewall",
    "Endpoint",
    "SendDatagram",
    "StreamClose",
    "StreamWrite",
]
