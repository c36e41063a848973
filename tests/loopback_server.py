"""A small threaded knock server on loopback, built on the sans-I/O endpoint, for client tests.

Not the product server (that is ``fastknock.server``): no event loop, wide limits, a fake
firewall that records what it was asked. Knobs for tests: ``firewall_ok`` (the firewall's
answer), ``drop_first`` (UDP: silently drop this many first datagrams, to prove the client's
retransmission) and ``mute`` (receive but never answer).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

from fastknock.knockd.endpoint import (
    Action,
    AskFirewall,
    Endpoint,
    SendDatagram,
    StreamClose,
    StreamWrite,
)
from fastknock.knockd.limits import Limits
from fastknock.knockd.peer import key_of
from fastknock.protocol import FirewallRequest, ServerSettings


@dataclass
class LoopbackServer:
    """The product's sans-I/O endpoint behind blocking sockets and threads (one lock)."""

    settings: ServerSettings
    udp: bool
    family: socket.AddressFamily = socket.AF_INET6
    firewall_ok: bool = True
    drop_first: int = 0
    mute: bool = False
    requests: list[FirewallRequest] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.endpoint = Endpoint(self.settings, Limits(1024, 1024), os.urandom)
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        kind = socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM
        self.sock = socket.socket(self.family, kind)
        if self.family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::" if self.family == socket.AF_INET6 else "127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if not self.udp:
            self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _carry_out(self, actions: list[Action]) -> None:
        """Called with the lock held: the firewall answers at once."""
        while actions:
            for action in actions:
                if isinstance(action, SendDatagram):
                    self.sock.sendto(action.data, action.addr)  # type: ignore[arg-type]
                elif isinstance(action, StreamWrite):
                    self._conns[action.conn].sendall(action.data)
                elif isinstance(action, StreamClose):
                    self._conns[action.conn].shutdown(socket.SHUT_RDWR)
                elif isinstance(action, AskFirewall):
                    self.requests.append(action.request)
                    self.endpoint.firewall_done(action.ticket, self.firewall_ok, time.monotonic())
            actions = self.endpoint.actions()

    def _serve(self) -> None:
        conn_ids = iter(range(1, 1 << 30))
        while not self._stop.is_set():
            with self._lock:
                self.endpoint.handle_timer(time.monotonic())
                self._carry_out(self.endpoint.actions())
            try:
                if self.udp:
                    data, addr = self.sock.recvfrom(2048)
                else:
                    conn, addr = self.sock.accept()
                    args = (conn, addr, next(conn_ids))
                    threading.Thread(target=self._serve_tcp, args=args, daemon=True).start()
                    continue
            except (TimeoutError, OSError):
                continue
            self.received.append(data)
            if self.drop_first > 0:
                self.drop_first -= 1
                continue
            if self.mute:
                continue
            with self._lock:
                self.endpoint.receive_datagram(data, key_of(addr), addr, time.monotonic())
                self._carry_out(self.endpoint.actions())

    def _serve_tcp(self, conn: socket.socket, addr: tuple, conn_id: int) -> None:
        with conn:
            conn.settimeout(self.settings.timeout)
            with self._lock:
                self._conns[conn_id] = conn
                if not self.endpoint.tcp_connected(conn_id, key_of(addr), time.monotonic()):
                    return
            try:
                while not self._stop.is_set():
                    data = conn.recv(4096)
                    if not data:
                        break
                    self.received.append(data)
                    if self.mute:
                        continue
                    with self._lock:
                        self.endpoint.tcp_received(conn_id, data, time.monotonic())
                        self._carry_out(self.endpoint.actions())
            except OSError:
                pass
            finally:
                with self._lock:
                    self.endpoint.tcp_closed(conn_id)
                    self._conns.pop(conn_id, None)
