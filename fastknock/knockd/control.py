"""fastknockd's control-port transports: thin asyncio layers around the sans-I/O server core.

- UDP (``UdpControl``, an asyncio ``DatagramProtocol``): one session per peer (IP, port). A
  datagram that is not 56 bytes is dropped before anything else. A datagram from a peer
  without a session goes to ``ServerCore.start``, whose fused check (size, magic, operation,
  user, MAC) runs before any state exists: junk and forgeries never create a session.
- TCP (``Controller.handle_tcp``): one session per connection, TCP_NODELAY, exact 56-byte
  reads, each bounded by the control timeout.

Bounded state (``Limits``): at most ``max_sessions`` live sessions in all and
``max_per_source`` per source (an IPv4 address, or an IPv6 /56 prefix, so that one host
cannot dodge the cap by cycling through its own addresses), and at most ``MAX_QUEUED``
datagrams waiting per UDP session while its firewall request is in flight. Past a cap the
*newest* is dropped, never an established session. Every session has a deadline timer.

The firewall is injected (``Firewall``: an async callable -> bool), so the controller runs
against fastknockfwd in production and against fakes in unit tests. Outcomes are counted per
reason; successes are logged at info level, rejections at debug level only (a flood must
not flood the journal).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

from fastknock.message import MSG_SIZE, Operation
from fastknock.protocol import (
    Event,
    FirewallRequest,
    IPAddress,
    Outcome,
    Send,
    ServerCore,
    ServerSession,
    SessionClosed,
    normalize_peer,
)

log = logging.getLogger("fastknockd")

MAX_QUEUED = 4
IPV6_SOURCE_PREFIX = 56

Firewall = Callable[[FirewallRequest, float], Awaitable[bool]]


@functools.lru_cache(maxsize=4096)  # bounded; building an IPv6Network costs ~15 us
def source_key(peer: IPAddress) -> IPAddress | ipaddress.IPv6Network:
    """What the per-source cap counts: the IPv4 address, or the IPv6 /56 it lies in."""
    if isinstance(peer, ipaddress.IPv6Address):
        return ipaddress.IPv6Network((peer, IPV6_SOURCE_PREFIX), strict=False)
    return peer


class Limits:
    """Counts live sessions in all and per source; refuses past either cap."""

    def __init__(self, max_sessions: int, max_per_source: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_source = max_per_source
        self.total = 0
        self._per_source: dict[object, int] = {}

    def acquire(self, peer: IPAddress) -> bool:
        key = source_key(peer)
        n = self._per_source.get(key, 0)
        if self.total >= self.max_sessions or n >= self.max_per_source:
            return False
        self._per_source[key] = n + 1
        self.total += 1
        return True

    def release(self, peer: IPAddress) -> None:
        key = source_key(peer)
        n = self._per_source.get(key, 0) - 1
        if n > 0:
            self._per_source[key] = n
        else:
            self._per_source.pop(key, None)
        self.total -= 1

    @property
    def sources(self) -> int:
        return len(self._per_source)


class Controller:
    """What both transports share: the core, the limits, the firewall, counters and logs."""

    def __init__(self, core: ServerCore, firewall: Firewall, limits: Limits) -> None:
        self.core = core
        self.firewall = firewall
        self.limits = limits
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def timeout(self) -> float:
        """The control timeout of the current core (a reload swaps the core)."""
        return self.core.settings.timeout

    def ended(self, end: SessionClosed, peer: IPAddress | str) -> None:
        self.counters[f"outcome_{end.outcome.value}"] += 1
        if end.ok:
            verb = "knocked" if end.operation is Operation.KNOCK else "revoked"
            self.counters[verb] += 1
            log.info("[%s] resource %08X %s by user %08X", peer, end.resource, verb, end.user)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[%s] rejected (%s) user %08X resource %08X",
                peer,
                end.outcome.value,
                end.user,
                end.resource,
            )

    async def ask_firewall(self, request: FirewallRequest, deadline: float) -> bool:
        try:
            ok = await self.firewall(request, max(deadline - time.monotonic(), 0.01))
        except Exception:  # a broken firewall link must never take the server down
            log.exception("firewall request failed")
            ok = False
        if not ok:
            self.counters["firewall_errors"] += 1
        return ok

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- TCP ---------------------------------------------------------------------------------

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = normalize_peer(writer.get_extra_info("peername")[0])
        self.counters["tcp_connections"] += 1
        if not self.limits.acquire(peer):
            self.counters["dropped_limits"] += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        if task is not None:  # so that close() ends it like the UDP firewall tasks
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await self._tcp_session(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            self.counters["tcp_aborted"] += 1
        except asyncio.CancelledError:
            # fastknockd is stopping (close()). End the handler normally: asyncio.streams
            # (Python 3.11) logs a cancelled connection handler as an error with a traceback.
            self.counters["tcp_cancelled"] += 1
        finally:
            self.limits.release(peer)
            writer.close()

    async def _tcp_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: IPAddress
    ) -> None:
        session: ServerSession | None = None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                data = await asyncio.wait_for(
                    reader.readexactly(MSG_SIZE), max(deadline - time.monotonic(), 0)
                )
            except asyncio.TimeoutError:
                if session is None:
                    events = self.core.silent_peer()
                else:
                    events = session.timeout(max(time.monotonic(), session.deadline))
                await self._tcp_act(events, writer, session, peer)
                return
            self.counters["received"] += 1
            now = time.monotonic()
            if session is None:
                session, events = self.core.start(data, peer, now)
            else:
                events = session.receive(data, now)
            if await self._tcp_act(events, writer, session, peer):
                return
            deadline = session.deadline if session is not None else deadline

    async def _tcp_act(
        self,
        events: list[Event],
        writer: asyncio.StreamWriter,
        session: ServerSession | None,
        peer: IPAddress,
    ) -> bool:
        """Carry out events; True once the session has ended.

        A session's last message (COMEIN or GOAWAY) is written and the session is accounted
        for without yielding to the loop, so its outcome is counted and logged even if the
        peer hangs up at once; closing the writer (``handle_tcp``) flushes it. Messages of a
        session that goes on (CHALLENGE) are drained within the control timeout.
        """
        for event in events:
            if isinstance(event, Send):
                writer.write(event.data)
            elif isinstance(event, FirewallRequest) and session is not None:
                ok = await self.ask_firewall(event, session.deadline)
                done = session.firewall_done(ok, time.monotonic())
                return await self._tcp_act(done, writer, session, peer)
            elif isinstance(event, SessionClosed):
                self.ended(event, peer)
                return True
        await asyncio.wait_for(writer.drain(), self.timeout)
        return False


class _UdpPeer:
    __slots__ = ("addr", "peer", "session", "queue", "busy", "timer")

    def __init__(self, addr: tuple, peer: IPAddress, session: ServerSession) -> None:
        self.addr = addr
        self.peer = peer
        self.session = session
        self.queue: list[bytes] = []
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None


class UdpControl(asyncio.DatagramProtocol):
    """The UDP control port. Sessions are keyed by the peer's (IP, port)."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.peers: dict[tuple, _UdpPeer] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not an asyncio.DatagramTransport subclass: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP errors for sendto
        self.c.counters["udp_errors"] += 1

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        counters = self.c.counters
        counters["received"] += 1
        if len(data) != MSG_SIZE:
            counters["outcome_size"] += 1
            return
        key = addr[:2]
        state = self.peers.get(key)
        if state is not None:
            if state.busy:
                if len(state.queue) < MAX_QUEUED:
                    state.queue.append(data)
                else:
                    counters["dropped_queue"] += 1
                return
            self._act(state, state.session.receive(data, time.monotonic()))
            return
        peer = normalize_peer(addr[0])
        if not self.c.limits.acquire(peer):
            counters["dropped_limits"] += 1
            return
        session, events = self.c.core.start(data, peer, time.monotonic())
        if session is None:
            self.c.limits.release(peer)
            self._send_and_end(events, addr, peer)
            return
        state = _UdpPeer(addr, peer, session)
        self.peers[key] = state
        counters["sessions"] += 1
        self._arm(state)
        self._act(state, events)

    def _send_and_end(self, events: list[Event], addr: tuple, peer: IPAddress) -> None:
        for event in events:
            if isinstance(event, Send) and self.transport is not None:
                self.transport.sendto(event.data, addr)
            elif isinstance(event, SessionClosed):
                self.c.ended(event, peer)

    def _arm(self, state: _UdpPeer) -> None:
        if state.timer is not None:
            state.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(state.session.deadline - time.monotonic(), 0)
        state.timer = loop.call_later(delay, self._expire, state)

    def _expire(self, state: _UdpPeer) -> None:
        state.timer = None
        if self.peers.get(state.addr[:2]) is state and not state.session.closed:
            self._act(state, state.session.timeout(max(time.monotonic(), state.session.deadline)))

    def _act(self, state: _UdpPeer, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Send):
                if self.transport is not None:
                    self.transport.sendto(event.data, state.addr)
            elif isinstance(event, FirewallRequest):
                state.busy = True
                self._arm(state)
                self.c.spawn(self._firewall(state, event))
            elif isinstance(event, SessionClosed):
                self._forget(state)
                self.c.ended(event, state.peer)

    async def _firewall(self, state: _UdpPeer, request: FirewallRequest) -> None:
        ok = await self.c.ask_firewall(request, state.session.deadline)
        state.busy = False
        if state.session.closed:  # timed out meanwhile; the client already got its answer
            return
        self._act(state, state.session.firewall_done(ok, time.monotonic()))
        queued, state.queue = state.queue, []
        for data in queued:
            if state.session.closed or state.busy:
                break
            self._act(state, state.session.receive(data, time.monotonic()))

    def _forget(self, state: _UdpPeer) -> None:
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if self.peers.get(state.addr[:2]) is state:
            del self.peers[state.addr[:2]]
            self.c.limits.release(state.peer)

    def close(self) -> None:
        for state in list(self.peers.values()):
            self._forget(state)
        if self.transport is not None:
            self.transport.close()


__all__ = ["Controller", "Limits", "UdpControl", "Outcome", "source_key"]
