"""fastknockd's asyncio layer: transports in, the endpoint's actions out. Nothing else.

``Controller`` drives one ``endpoint.Endpoint``: after every input it carries out the
endpoint's actions (``flush``, the one interpreter of them), re-arms the single timer at
``next_timer()`` and runs each firewall request as a task, feeding the answer back with
``firewall_done``. The transports are thin:

- ``UdpProtocol``: the plain asyncio ``DatagramProtocol`` path (``--udp-path protocol``),
  one callback per datagram. The batched path (``recv.BatchedUdp``) feeds the same endpoint.
- ``TcpProtocol``: one asyncio ``Protocol`` per connection (TCP_NODELAY); the endpoint
  splits the byte stream into 56-byte messages and owns the connection's deadline.

The firewall is injected (``FirewallLink``: an async callable -> bool), so the controller
runs against fastknockfwd in production and against fakes in unit tests; an exception from
it is logged and counts as a refusal. ``reload(settings)`` reconfigures the endpoint and
every reader that registered with ``on_reload``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from fastknock.knockd.counters import Count
from fastknock.knockd.endpoint import (
    AskFirewall,
    Endpoint,
    SendDatagram,
    StreamClose,
    StreamWrite,
)
from fastknock.knockd.peer import key_of
from fastknock.protocol import FirewallRequest, ServerSettings

log = logging.getLogger("fastknockd")

FirewallLink = Callable[[FirewallRequest, float], Awaitable[bool]]
SendTo = Callable[[bytes, Any], None]


class Controller:
    """Runs an ``Endpoint`` on the running event loop; see the module docstring."""

    def __init__(self, endpoint: Endpoint, firewall: FirewallLink) -> None:
        self.endpoint = endpoint
        self.firewall = firewall
        self.counters = endpoint.counters
        self._sendto: SendTo | None = None
        self._streams: dict[int, asyncio.BaseTransport] = {}
        self._conn_ids = iter(range(1, 1 << 62))
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_hooks: list[Callable[[ServerSettings], None]] = []

    @property
    def timeout(self) -> float:
        return self.endpoint.timeout

    def attach_udp(self, sendto: SendTo) -> None:
        """Serve UDP: replies go to ``sendto``, and the endpoint's timer (the challenge
        secrets' rotation among them) runs from now on, traffic or not: a batched reader
        answers KNOCKs with the secrets it was last given, never through a flush."""
        self._sendto = sendto
        self._rearm()

    def on_reload(self, hook: Callable[[ServerSettings], None]) -> None:
        self._reload_hooks.append(hook)

    def reload(self, settings: ServerSettings) -> None:
        self.endpoint.reload(settings, time.monotonic())
        for hook in self._reload_hooks:
            hook(settings)

    # -- the one interpreter of the endpoint's actions ----------------------------------

    def flush(self) -> None:
        for action in self.endpoint.actions():
            kind = type(action)
            if kind is SendDatagram:
                action = cast(SendDatagram, action)
                if self._sendto is not None:
                    self._sendto(action.data, action.addr)
            elif kind is StreamWrite:
                action = cast(StreamWrite, action)
                transport = self._streams.get(action.conn)
                if transport is not None:
                    cast(asyncio.WriteTransport, transport).write(action.data)
            elif kind is StreamClose:
                transport = self._streams.pop(cast(StreamClose, action).conn, None)
                if transport is not None:
                    transport.close()  # flushes what was written first
            else:
                self.spawn(self._ask_firewall(cast(AskFirewall, action)))
        self._rearm()

    def _rearm(self) -> None:
        when = self.endpoint.next_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(when - time.monotonic(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.endpoint.handle_timer(time.monotonic())
        self.flush()

    async def _ask_firewall(self, action: AskFirewall) -> None:
        try:
            ok = await self.firewall(action.request, max(action.deadline - time.monotonic(), 0.01))
        except Exception:  # a broken firewall link must never take the server down
            log.exception("firewall request failed")
            ok = False
        self.endpoint.firewall_done(action.ticket, ok, time.monotonic())
        self.flush()

    @property
    def quiet(self) -> bool:
        """No firewall request in flight and no TCP connection open: nothing in the loop
        waits on a prompt turn, so the batched UDP reader may rest (``_recv.pyx``)."""
        return not self._tasks and not self._streams

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- TCP connections ----------------------------------------------------------------

    def open_stream(self, transport: asyncio.BaseTransport) -> int:
        conn = next(self._conn_ids)
        self._streams[conn] = transport
        return conn

    def stream_lost(self, conn: int) -> None:
        self._streams.pop(conn, None)
        self.endpoint.tcp_closed(conn)
        self.flush()

    async def close(self) -> None:
        self.endpoint.shutdown()
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in self._streams.values():
            transport.close()
        self._streams.clear()


class TcpProtocol(asyncio.Protocol):
    """One TCP control connection, fed to the endpoint."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.conn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = key_of(transport.get_extra_info("peername"))
        self.conn = self.c.open_stream(transport)
        if not self.c.endpoint.tcp_connected(self.conn, key, time.monotonic()):
            self.c._streams.pop(self.conn, None)
            self.conn = 0
            cast(asyncio.WriteTransport, transport).abort()
            return
        self.c.flush()

    def data_received(self, data: bytes) -> None:
        if self.conn:
            self.c.endpoint.tcp_received(self.conn, data, time.monotonic())
            self.c.flush()

    def eof_received(self) -> bool:
        return False  # close our side too: a half-closed peer can send no RESPONSE

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn:
            self.c.stream_lost(self.conn)
            self.conn = 0


class UdpProtocol(asyncio.DatagramProtocol):
    """The UDP control port as an asyncio ``DatagramProtocol`` (one callback a datagram)."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not an asyncio.DatagramTransport subclass: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.c.attach_udp(self.transport.sendto)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP errors for sendto
        self.c.counters[Count.UDP_ERRORS] += 1

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.c.endpoint.receive_datagram(data, key_of(addr), addr, time.monotonic())
        self.c.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


__all__ = ["Controller", "FirewallLink", "TcpProtocol", "UdpProtocol"]
