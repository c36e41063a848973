"""fastknockd's sans-I/O endpoint: every control session, its caps, queue and deadline.

Shaped like aioquic's connection object. The I/O layer (``control.py``: asyncio transports,
the batched C reader) feeds it and then carries out what it asks for:

  feed:   receive_datagram(data, key, addr, now)            UDP, keyed by a ``peer`` key
          tcp_connected(conn, key, now) -> bool / tcp_received(conn, data, now) / tcp_closed(conn)
          firewall_done(ticket, ok, now)                     the answer to an AskFirewall
          handle_timer(now)                                  when now >= next_timer()
  drain:  actions() -> [SendDatagram | StreamWrite | StreamClose | AskFirewall]
          next_timer() -> float | None
  other:  reload(settings), watch(callback), shutdown(), counters, budgets

No sockets, no clock, no tasks in here: ``now`` is passed in, randomness is the core's
injected ``rand``. The protocol rules themselves live in ``fastknock.protocol``; this object
owns what is per peer, and when it exists:

* UDP is stateless until a RESPONSE proves the key: a KNOCK/REVOKE that passes rules 1-3
  gets a *computed* CHALLENGE (``challenges.Challenger``) and leaves nothing behind; a
  RESPONSE that matches a token (and was not used before) starts a full-auth session that
  only waits for the firewall. So a replayed KNOCK, from any number of addresses, holds
  no slot; and each distinct KNOCK is answered for at most a few peers per epoch
  (``replaycap.ReplayCap``, looked up before the MAC, filled after it), so such a replay
  costs a lookup, silently dropped (``knock-replay-capped``) like the other caps. A datagram
  from a peer whose session is waiting for the firewall is dropped and counted
  (``unfit``); it never ends or changes that session.
* TCP keeps a session per connection (the handshake proved the address), with the
  protocol's random token.
* The budgets (``limits.Budgets``; what each protects and the worst case are in that
  module's header): UDP sessions; TCP connections that have not proved the key yet (a
  short deadline, a small budget of their own, the oldest evicted when it is full); TCP
  sessions that have. Caps are in all, per source (IPv4 address, IPv6 /56) and per IPv6
  /48; past a cap the newest is refused (pre-auth TCP: the oldest is evicted), never an
  authenticated session. At most ``MAX_QUEUED`` messages wait per TCP session while its
  firewall request is in flight. One deadline per session (a heap with lazy deletion;
  ``next_timer`` is its earliest live entry, or the next rotation of the challenge
  secrets). A cap that is hit is counted, and logged as one warning a minute at most,
  naming the cap and the source that holds the most of it.

``watch(callback)`` tells the batched reader, synchronously, when a UDP session starts
(``callback(key, True)``) and ends (``False``): the reader's C set of live peers is exactly
this endpoint's, with no shared dict and no address strings to agree on.
``on_secrets(callback)`` tells it the challenge secrets after every rotation, so that it can
answer KNOCKs and reject forged RESPONSEs in C.

Outcomes are counted (``counters.Count``) and logged here, in one place: successes at info
level, rejections at debug level only (a flood must not flood the journal).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

from fastknock import wire
from fastknock.errors import WireError
from fastknock.knockd.actions import (
    Action,
    AskFirewall,
    SendDatagram,
    StreamClose,
    StreamWrite,
)
from fastknock.knockd.challenges import Challenger
from fastknock.knockd.counters import Count, Counters
from fastknock.knockd.limits import Budgets, Limits, describe
from fastknock.knockd.peer import peer_of
from fastknock.knockd.replaycap import SEED_SIZE, ReplayCap
from fastknock.message import MSG_SIZE, Operation
from fastknock.protocol import (
    Event,
    FirewallRequest,
    Outcome,
    Rand,
    Send,
    ServerCore,
    ServerSession,
    ServerSettings,
    SessionClosed,
)

log = logging.getLogger("fastknockd")

MAX_QUEUED = 4
WARN_INTERVAL = 60.0  # seconds between two "cap reached" warnings


Watcher = Callable[[bytes, bool], None]
SecretsHook = Callable[[Challenger], None]
_RESPONSE = Operation.RESPONSE.to_bytes(4, "big")
# Refusals before the MAC passed: a KNOCK refused otherwise (rule 3) still counts in the cap.
_PRE_MAC = frozenset({Outcome.SIZE, Outcome.MAGIC, Outcome.OPERATION, Outcome.UNKNOWN_USER,
                      Outcome.MAC})  # fmt: skip


class _Slot:
    """One live session: a UDP peer, or a TCP connection (``conn`` set)."""

    __slots__ = ("key", "addr", "conn", "budget", "session", "queue", "busy", "deadline",
                 "done", "gone", "buf")  # fmt: skip

    def __init__(self, key: bytes, addr: object, conn: int | None, budget: Limits) -> None:
        self.key = key
        self.addr = addr
        self.conn = conn
        self.budget = budget  # the budget this session holds a place in
        self.session: ServerSession | None = None
        self.queue: list[bytes] = []
        self.busy = False  # a firewall request is in flight
        self.deadline = 0.0
        self.done = False  # forgotten: out of the tables, its slot in the caps released
        self.gone = False  # TCP: the connection is closed; nothing more can be written
        self.buf = b""  # TCP: bytes of an incomplete message


class Endpoint:
    """All control sessions of one fastknockd process (or worker); see the module docstring."""

    def __init__(
        self,
        settings: ServerSettings,
        budgets: Budgets | Limits,
        rand: Rand,
        now: float = 0.0,
    ) -> None:
        """``budgets``: or one ``Limits``, used for UDP and authenticated TCP alike, with
        the default pre-auth budget. ``now``: the clock's reading at start (the first epoch
        of the challenge secrets starts then)."""
        if isinstance(budgets, Limits):
            budgets = Budgets(budgets, budgets, Budgets.default().preauth)
        self._rand = rand
        self.core = ServerCore(settings, rand)
        self.budgets = budgets
        self.limits = budgets.udp
        self.counters = Counters()
        self._preauth: dict[int, _Slot] = {}  # TCP before full auth, oldest first
        self._warned: dict[str, float] = {}
        self._udp: dict[bytes, _Slot] = {}
        self._tcp: dict[int, _Slot] = {}
        self._timers: list[tuple[float, int, _Slot]] = []
        self._seq = itertools.count()
        self._out: list[Action] = []
        self._watchers: list[Watcher] = []
        self._secrets_hooks: list[SecretsHook] = []
        self.challenger = self._new_challenger(settings, now)
        self.replays = ReplayCap(rand(SEED_SIZE))

    def _new_challenger(self, settings: ServerSettings, now: float) -> Challenger:
        return Challenger(self._rand, settings.timeout, now, on_rotate=self._rotated)

    def _rotated(self) -> None:
        for hook in self._secrets_hooks:
            hook(self.challenger)

    # -- configuration ---------------------------------------------------------------------

    @property
    def settings(self) -> ServerSettings:
        return self.core.settings

    @property
    def timeout(self) -> float:
        return self.core.settings.timeout

    def reload(self, settings: ServerSettings, now: float = 0.0) -> None:
        """New sessions use ``settings``; sessions in flight finish on the old ones. A new
        control timeout is a new epoch length: new challenge secrets (outstanding tokens
        die; their clients knock again)."""
        old = self.core.settings.timeout
        self.core = ServerCore(settings, self._rand)
        if settings.timeout != old:
            self.challenger = self._new_challenger(settings, now)
            self._rotated()

    def watch(self, callback: Watcher) -> None:
        self._watchers.append(callback)

    def on_secrets(self, callback: SecretsHook) -> None:
        self._secrets_hooks.append(callback)

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
        if key in self._udp:  # full-auth, waiting for the firewall: nothing fits now
            counters[Count.DROPPED_UNFIT] += 1
            return
        if data[4:8] == _RESPONSE:
            self._response(data, key, addr, now)
            return
        self.challenger.advance(now)
        auth, epoch = data[24:], self.challenger.epoch
        if self.replays.refuses(auth, key, epoch):
            counters[Count.KNOCK_REPLAY_CAPPED] += 1
            return
        msg, events = self.core.first(data)
        if msg is not None or not any(
            isinstance(e, SessionClosed) and e.outcome in _PRE_MAC for e in events
        ):
            if self.replays.record(auth, key, epoch):
                counters[Count.KNOCK_CAP_EVICTED] += 1
        if msg is None:
            self._stateless(events, key, addr)
            return
        self._out.append(SendDatagram(self.challenger.challenge(msg, key, now), addr))
        counters[Count.CHALLENGES] += 1

    def _response(self, data: bytes, key: bytes, addr: object, now: float) -> None:
        """A RESPONSE from a peer without state: it must match a computed token."""
        try:
            msg = wire.parse(data)
        except WireError:
            self._stateless(self.core.refuse(Outcome.MAGIC, None), key, addr)
            return
        user_key = self.core.settings.keyring.get(msg.user)
        if user_key is None:
            self._stateless(self.core.refuse(Outcome.UNKNOWN_USER, msg), key, addr)
            return
        match = self.challenger.match(msg, user_key, key, now)
        if match is None:
            self._stateless(self.core.refuse(Outcome.RESPONSE_MAC, msg), key, addr)
            return
        budget = self.budgets.udp
        if not budget.acquire(key):  # before the token is spent: the client may retry
            self._cap_hit("udp", budget, key, now)
            return
        op, tok, epoch = match
        if not self.challenger.consume(tok, epoch, now, msg.auth):
            budget.release(key)
            self._stateless(self.core.refuse(Outcome.REPLAY, msg), key, addr)
            return
        session, events = self.core.authenticated(op, msg, peer_of(key), now)
        if session is None:
            budget.release(key)
            self._stateless(events, key, addr)
            return
        slot = _Slot(key, addr, None, budget)
        slot.session = session
        self._udp[key] = slot
        self.counters[Count.SESSIONS] += 1
        for watcher in self._watchers:
            watcher(key, True)
        self._act(slot, events)

    def _stateless(self, events: list[Event], key: bytes, addr: object) -> None:
        for event in events:
            if isinstance(event, Send):
                self._out.append(SendDatagram(event.data, addr))
            elif isinstance(event, SessionClosed):
                self._ended(event, key)

    # -- TCP ------------------------------------------------------------------------------

    def tcp_connected(self, conn: int, key: bytes, now: float) -> bool:
        """A new connection; False: refused (its source's pre-auth caps), the I/O layer
        aborts it. A full pre-auth budget evicts its oldest connection instead."""
        self.counters[Count.TCP_CONNECTIONS] += 1
        budget = self.budgets.preauth
        refusal = budget.refusal(key)
        if refusal == "total":
            self._cap_hit("tcp-preauth", budget, key, now, refused=False)
            oldest = next(iter(self._preauth.values()))
            self.counters[Count.TCP_PREAUTH_EVICTED] += 1
            self._close_tcp(oldest)
        elif refusal is not None:
            self._cap_hit(f"tcp-preauth-{refusal}", budget, key, now)
            return False
        budget.acquire(key)
        slot = _Slot(key, None, conn, budget)
        self._tcp[conn] = slot
        self._preauth[conn] = slot
        self._arm(slot, now + min(self.budgets.preauth_timeout, self.timeout))
        return True

    def _close_tcp(self, slot: _Slot) -> None:
        """Close a TCP connection without an outcome (evicted)."""
        if slot.conn is not None and not slot.gone:
            self._out.append(StreamClose(slot.conn))
        slot.gone = True
        self._forget(slot)

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

    def _promote(self, slot: _Slot, now: float) -> bool:
        """A TCP session proved the key: from the pre-auth budget to the TCP budget."""
        budget = self.budgets.tcp
        if not budget.acquire(slot.key):
            self._cap_hit("tcp", budget, slot.key, now)
            self._close_tcp(slot)
            return False
        assert slot.conn is not None
        slot.budget.release(slot.key)
        self._preauth.pop(slot.conn, None)
        slot.budget = budget
        return True

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
        rotation = self.challenger.next_rotation
        return min(timers[0][0], rotation) if timers else rotation

    def handle_timer(self, now: float) -> None:
        self.challenger.advance(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, slot = heapq.heappop(timers)
            if slot.done or deadline != slot.deadline:
                continue
            if slot.session is None:  # TCP: no complete first message in time
                self.counters[Count.TCP_PREAUTH_DEADLINE] += 1
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
                if slot.conn is not None and slot.conn in self._preauth:
                    if not self._promote(slot, slot.session.deadline if slot.session else 0.0):
                        return
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
            self._preauth.pop(slot.conn, None)
        slot.budget.release(slot.key)

    def _cap_hit(
        self, cap: str, budget: Limits, key: bytes, now: float, refused: bool = True
    ) -> None:
        """Count a cap that was hit; warn at most once a minute per cap (never a key)."""
        if refused:
            self.counters[Count.DROPPED_LIMITS] += 1
            if cap.startswith("tcp-preauth"):
                self.counters[Count.DROPPED_TCP_BUDGET] += 1
            if cap.endswith("-site"):
                self.counters[Count.DROPPED_SITE] += 1
        last = self._warned.get(cap)
        if last is not None and now - last < WARN_INTERVAL:
            return
        self._warned[cap] = now
        top = budget.top_source()
        log.warning(
            "cap %s reached (%d in use); the source holding most: %s",
            cap,
            budget.total,
            describe(top) if top is not None else "none",
        )

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
