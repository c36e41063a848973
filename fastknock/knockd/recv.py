"""The batched UDP receive path of fastknockd: the reader implementation and its asyncio glue.

Design
------
* ``Reader`` is the Cython ``fastknock.knockd._recv.Reader`` (``recvmmsg`` in batches of 64, the
  fused ``KeyRing`` check in C with the GIL released) or, with
  ``FASTKNOCK_NO_EXTENSIONS=1`` or when it is not built, the pure-Python reference
  ``fastknock.knockd._recv_py.Reader``. ``IMPLEMENTATION`` says which ("c" or "py").
* ``BatchedUdpControl`` *is* a ``control.UdpControl``: the reader only decides which
  datagrams reach ``datagram_received`` and drops the rest, counted by reason, so every
  session, limit, queue, timer and reply is handled by the same code as on the
  ``DatagramProtocol`` path. The reader hands up: datagrams from a peer with a live
  session, datagrams that pass the fused first-message check, and -- when the error policy
  is ``always`` (rejections get a GOAWAY) or debug logging is on (one log line per reject)
  -- every 56-byte datagram, so that what a peer sees and what is logged stay identical.
  One difference in bookkeeping only: a datagram that fails the check is counted under its
  reason even while the session caps are full (the ``DatagramProtocol`` path checks the
  caps first and counts it as ``dropped_limits``); either way it is dropped silently.
* Replies go out with a plain non-blocking ``sendto`` (``SocketTransport``); a reply that
  meets a full send buffer is dropped and counted (``udp_send_dropped``): the client
  retransmits, as it would for a lost datagram.
* The reader's counters are merged into ``Controller.counters`` after every drain, under the
  names the ``DatagramProtocol`` path uses (``received``, ``outcome_<reason>``) plus
  ``udp_batches``, ``udp_handed_up``, ``udp_live_hits`` and ``udp_reader_errors``.
* ``open_udp(controller, sock, path)`` starts either path on a bound socket; ``server.py``
  and the tests use it, so the same tests run against both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Literal

from fastknock.conf.config import ErrorPolicy
from fastknock.knockd.control import Controller, UdpControl
from fastknock.protocol import FIRST_OPS

__all__ = ["COUNTER_NAMES", "IMPLEMENTATION", "PATHS", "BatchedUdpControl", "Reader", "open_udp"]

IMPLEMENTATION: str

if TYPE_CHECKING:
    from fastknock.knockd._recv_py import COUNTERS, Reader
elif os.environ.get("FASTKNOCK_NO_EXTENSIONS") == "1":
    from fastknock.knockd._recv_py import COUNTERS, Reader
else:
    try:
        from fastknock.knockd._recv import COUNTERS, Reader
    except ImportError:  # not built: the pure-Python reference
        from fastknock.knockd._recv_py import COUNTERS, Reader

IMPLEMENTATION = "c" if Reader.__module__ == "fastknock.knockd._recv" else "py"

log = logging.getLogger("fastknockd")

UdpPath = Literal["batched", "protocol"]
PATHS: tuple[UdpPath, ...] = ("batched", "protocol")

# Reader.take() field -> Controller.counters key (the DatagramProtocol path's names).
COUNTER_NAMES = {
    "dropped": "received",
    "size": "outcome_size",
    "magic": "outcome_magic",
    "operation": "outcome_operation",
    "unknown_user": "outcome_unknown-user",
    "mac": "outcome_mac",
    "handed_up": "udp_handed_up",
    "live_hits": "udp_live_hits",
    "batches": "udp_batches",
    "errors": "udp_reader_errors",
}
_MERGE = tuple(COUNTER_NAMES[name] for name in COUNTERS)


class SocketTransport:
    """What ``UdpControl`` uses of a datagram transport, on a plain non-blocking socket."""

    def __init__(self, sock: socket.socket, protocol: BatchedUdpControl) -> None:
        self._sock = sock
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._protocol.c.counters["udp_send_dropped"] += 1
        except OSError as exc:
            self._protocol.error_received(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._protocol.stop_reading()
        self._sock.close()

    abort = close


class BatchedUdpControl(UdpControl):
    """``UdpControl`` fed by a batched ``Reader`` instead of ``datagram_received`` calls
    from an asyncio transport. Create it inside the running loop."""

    def __init__(self, controller: Controller, sock: socket.socket, budget: int = 16) -> None:
        super().__init__(controller)
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        settings = controller.core.settings
        self.reader = Reader(
            sock,
            settings.keyring,
            self.datagram_received,
            self.peers,
            pass_rejects=self._pass_rejects(),
            allowed_ops=FIRST_OPS,
            budget=budget,
        )
        self._reading = True
        self.connection_made(SocketTransport(sock, self))  # type: ignore[arg-type]
        self._loop.add_reader(self._fd, self._readable)

    def _pass_rejects(self) -> bool:
        return self.c.core.settings.policy is ErrorPolicy.ALWAYS or log.isEnabledFor(logging.DEBUG)

    def _readable(self) -> None:
        reader = self.reader
        ring = self.c.core.settings.keyring
        if ring is not reader.keyring:  # the core was swapped (config reload)
            reader.configure(ring, self._pass_rejects())
        try:
            reader.drain()
        finally:
            self.merge_counters()

    def merge_counters(self) -> None:
        counters = self.c.counters
        for name, value in zip(_MERGE, self.reader.take(), strict=True):
            if value:
                counters[name] += value

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            self.merge_counters()


async def open_udp(
    controller: Controller, sock: socket.socket, path: UdpPath = "batched"
) -> UdpControl:
    """Serve the UDP control port on the bound socket ``sock`` through ``path``."""
    if path == "batched":
        return BatchedUdpControl(controller, sock)
    if path != "protocol":
        raise ValueError(f"unknown UDP receive path {path!r}")
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: UdpControl(controller), sock=sock)
    return proto
