"""The batched UDP receive path of fastknockd: the reader implementation and its asyncio glue.

Design
------
* ``Reader`` is the Cython ``fastknock.knockd._recv.Reader`` (``recvmmsg`` in batches of 64, the
  fused ``KeyRing`` check in C with the GIL released) or, with
  ``FASTKNOCK_NO_EXTENSIONS=1`` or when it is not built, the pure-Python reference
  ``fastknock.knockd._recv_py.Reader``. ``IMPLEMENTATION`` says which ("c" or "py").
* ``BatchedUdp`` feeds the same ``endpoint.Endpoint`` as the ``DatagramProtocol`` path
  (``control.UdpProtocol``): the reader only decides which datagrams reach
  ``Endpoint.receive_datagram`` and drops the rest, counted by reason, so every session,
  limit, queue, timer and reply is handled by the same code on both paths. The reader
  hands up: datagrams from a peer with a live session, datagrams that pass the fused
  first-message check, and -- when the error policy is ``always`` (rejections get a
  GOAWAY) or debug logging is on (one log line per reject) -- every 56-byte datagram, so
  that what a peer sees and what is logged stay identical. It learns of live sessions
  from the endpoint (``Endpoint.watch`` -> ``Reader.track`` / ``untrack``, binary peer keys
  of ``peer.py``). One difference in bookkeeping only: a datagram that fails the check is
  counted under its reason even while the session caps are full (the ``DatagramProtocol``
  path checks the caps first and counts it as ``dropped_limits``); either way it is
  dropped silently.
* Replies go out with a plain non-blocking ``sendto`` after each drain; a reply that meets
  a full send buffer is dropped and counted (``udp_send_dropped``): the client retransmits,
  as it would for a lost datagram.
* The reader's counters are merged into the endpoint's at most every ``MERGE_DELAY``
  (1 ms) after a drain, by one loop timer, and at close (``counters.READER_FIELDS``):
  merging after every drain cost about 1 us per wake-up, which under a flood of small
  batches was a fifth of the path's cost over a bare C drain. The counters only report
  (metrics, stats log); nothing decides on them.
* Interrupt moderation, as NAPI does in the kernel (poll while busy, wait for the event
  when idle): under a stream of rejects the reader rests ``REST_US`` (200 us) once per
  wake-up before it reads again, instead of coming back to the loop for every datagram or
  two (``_recv.pyx``, "The rest"). It never rests when idle, within ``TALK_US`` of a
  hand-up or a CHALLENGE (a client's next datagram is due a round trip later), or while
  the loop has other work waiting (``Controller.quiet``: a firewall exchange takes about
  ten loop turns, and a resting drain holds the loop).
* ``open_udp(controller, sock, path)`` starts either path on a bound socket; ``server.py``
  and the tests use it, so the same tests run against both. A reload reconfigures the
  reader through ``Controller.on_reload`` (no per-drain check).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Literal

from fastknock import _ext
from fastknock.conf.config import ErrorPolicy
from fastknock.knockd.challenges import Challenger
from fastknock.knockd.control import Controller, UdpProtocol
from fastknock.knockd.counters import READER_FIELDS, Count
from fastknock.protocol import FIRST_OPS, ServerSettings

__all__ = ["IMPLEMENTATION", "PATHS", "BatchedUdp", "Reader", "open_udp"]

if TYPE_CHECKING:
    from fastknock.knockd._recv_py import COUNTERS, Reader

_IMPLS = ("fastknock.knockd._recv", "fastknock.knockd._recv_py")
IMPLEMENTATION = _ext.bind(globals(), *_IMPLS, ("COUNTERS", "Reader"))

log = logging.getLogger("fastknockd")

UdpPath = Literal["batched", "protocol"]
PATHS: tuple[UdpPath, ...] = ("batched", "protocol")

_MERGE = tuple(READER_FIELDS[name] for name in COUNTERS)
MERGE_DELAY = 0.001  # seconds: how stale the reader's counters in the endpoint's may get
REST_US = 200  # the reader's rest under a stream (Reader rest_us; _recv.pyx says why)
TALK_US = 5000  # no rest this long after a hand-up or a CHALLENGE (Reader talk_us)


class BatchedUdp:
    """The UDP control port read by a batched ``Reader`` on a plain non-blocking socket.
    Create it inside the running loop."""

    def __init__(self, controller: Controller, sock: socket.socket, budget: int = 16) -> None:
        sock.setblocking(False)
        self.c = controller
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        endpoint = controller.endpoint
        self.reader = Reader(
            sock,
            endpoint.settings.keyring,
            self._handle,
            pass_rejects=self._pass_rejects(endpoint.settings),
            allowed_ops=FIRST_OPS,
            budget=budget,
            rest_us=REST_US,
            talk_us=TALK_US,
        )
        self._reconfigure(endpoint.settings)
        # The reader answers KNOCKs with the challenger's secrets: start it on the current
        # epoch's (the endpoint may have been idle for epochs); attach_udp below keeps the
        # rotation timer running from then on.
        endpoint.challenger.advance(time.monotonic())
        self._secrets(endpoint.challenger)
        endpoint.watch(self._watch)
        endpoint.on_secrets(self._secrets)
        controller.attach_udp(self.sendto)
        controller.on_reload(self._reconfigure)
        self._reading = True
        self._merge_timer: asyncio.TimerHandle | None = None
        self._handed = False
        self._loop.add_reader(self._fd, self._readable)

    @staticmethod
    def _pass_rejects(settings: ServerSettings) -> bool:
        return settings.policy is ErrorPolicy.ALWAYS or log.isEnabledFor(logging.DEBUG)

    def _reconfigure(self, settings: ServerSettings) -> None:
        self.reader.configure(settings.keyring, self._pass_rejects(settings))
        self.reader.set_grants(self.c.endpoint.core.grants())

    def _secrets(self, challenger: Challenger) -> None:
        self.reader.set_secrets(*challenger.secrets())

    def _watch(self, key: bytes, live: bool) -> None:
        if live:
            self.reader.track(key)
        else:
            self.reader.untrack(key)

    def _handle(self, data: bytes, key: bytes, addr: tuple) -> None:
        self._handed = True
        self.c.endpoint.receive_datagram(data, key, addr, time.monotonic())

    def _readable(self) -> None:
        try:
            self.reader.drain(self.c.quiet)
        finally:
            if self._merge_timer is None:
                self._merge_timer = self._loop.call_later(MERGE_DELAY, self._merge_due)
            if self._handed:  # only a datagram handed up can have made actions or timers
                self._handed = False
                self.c.flush()

    def _merge_due(self) -> None:
        self._merge_timer = None
        self.merge_counters()

    def sendto(self, data: bytes, addr: Any) -> None:
        if not self._reading:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.c.counters[Count.UDP_SEND_DROPPED] += 1
        except OSError:
            self.c.counters[Count.UDP_ERRORS] += 1

    def merge_counters(self) -> None:
        counters = self.c.counters
        for targets, value in zip(_MERGE, self.reader.take(), strict=True):
            if value:
                for count in targets:
                    counters[count] += value

    def close(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            if self._merge_timer is not None:
                self._merge_timer.cancel()
                self._merge_timer = None
            self.merge_counters()
            self._sock.close()


async def open_udp(
    controller: Controller, sock: socket.socket, path: UdpPath = "batched"
) -> BatchedUdp | UdpProtocol:
    """Serve the UDP control port on the bound socket ``sock`` through ``path``."""
    if path == "batched":
        return BatchedUdp(controller, sock)
    if path != "protocol":
        raise ValueError(f"unknown UDP receive path {path!r}")
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: UdpProtocol(controller), sock=sock)
    return proto
