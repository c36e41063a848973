"""A small threaded knock server on loopback, built on the sans-I/O core, for client tests.

Not the product server (that is ``fastknock.server``): no event loop, no limits, a fake
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

from fastknock.protocol import (
    FirewallRequest,
    Send,
    ServerCore,
    ServerSession,
    ServerSettings,
    normalize_peer,
)


@dataclass
class LoopbackServer:
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
        self.core = ServerCore(self.settings, os.urandom)
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

    def _act(self, session: ServerSession | None, events: list, send: object) -> None:
        for event in events:
            if isinstance(event, Send):
                send(event.data)  # type: ignore[operator]
            elif isinstance(event, FirewallRequest) and session is not None:
                self.requests.append(event)
                self._act(session, session.firewall_done(self.firewall_ok, time.monotonic()), send)

    def _serve(self) -> None:
        sessions: dict[object, ServerSession] = {}
        while not self._stop.is_set():
            try:
                if self.udp:
                    data, addr = self.sock.recvfrom(2048)
                else:
                    conn, addr = self.sock.accept()
                    threading.Thread(target=self._serve_tcp, args=(conn, addr), daemon=True).start()
                    continue
            except (TimeoutError, OSError):
                continue
            self.received.append(data)
            if self.drop_first > 0:
                self.drop_first -= 1
                continue
            if self.mute or len(data) != 56:
                continue

            def send(out: bytes, addr: object = addr) -> None:
                self.sock.sendto(out, addr)

            now = time.monotonic()
            session = sessions.get(addr)
            if session is None or session.closed:
                session, events = self.core.start(data, normalize_peer(addr[0]), now)
                if session is not None:
                    sessions[addr] = session
            else:
                events = session.receive(data, now)
            self._act(session, events, send)

    def _serve_tcp(self, conn: socket.socket, addr: tuple) -> None:
        with conn:
            conn.settimeout(self.settings.timeout)
            session: ServerSession | None = None
            try:
                while not self._stop.is_set():
                    data = b""
                    while len(data) < 56:
                        chunk = conn.recv(56 - len(data))
                        if not chunk:
                            return
                        data += chunk
                    self.received.append(data)
                    if self.mute:
                        continue
                    now = time.monotonic()
                    if session is None:
                        session, events = self.core.start(data, normalize_peer(addr[0]), now)
                    else:
                        events = session.receive(data, now)
                    self._act(session, events, conn.sendall)
                    if session is None or session.closed:
                        return
            except OSError:
                return
