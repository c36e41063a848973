"""fastknockd's control sockets: bound by fastknockd, or passed by systemd.

Design
------
* ``bind_control`` binds the config's port for each transport it lists, dual-stack (one
  IPv6 socket that also accepts IPv4-mapped peers, or IPv4 only where the kernel has no
  IPv6), ``SO_REUSEPORT`` for ``--workers``, a large UDP receive buffer.
* ``activated`` takes what socket activation passed (``fastknockd.socket``) but serves only
  what the config lists: anything else (a TCP socket for a UDP-only server, another port,
  a second socket of a kind) is closed with a warning, so socket activation can never
  answer on a transport the administrator did not configure (stealth); a listed one that is
  missing refuses the start.
"""

from __future__ import annotations

import logging
import socket

from fastknock.conf.model import Config
from fastknock.errors import FastknockError
from fastknock.osutil import systemd

log = logging.getLogger("fastknockd")

# Receive buffer of the UDP control socket: room for a few thousand datagrams, so a burst or
# a scheduling hiccup under a flood does not drop a legitimate KNOCK in the kernel. The
# kernel caps it at net.core.rmem_max.
UDP_RCVBUF = 4 << 20


def bind(port: int, kind: socket.SocketKind, reuseport: bool = False) -> socket.socket:
    """A dual-stack socket on ``port`` (IPv4-only if the kernel lacks IPv6)."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple = ("::", port)
    except OSError:
        sock = socket.socket(socket.AF_INET, kind)
        addr = ("0.0.0.0", port)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


Sockets = tuple[socket.socket | None, socket.socket | None]  # (UDP, TCP)


def bind_control(config: Config, reuseport: bool = False) -> Sockets:
    udp = bind(config.port, socket.SOCK_DGRAM, reuseport) if config.port_udp else None
    try:
        tcp = bind(config.port, socket.SOCK_STREAM, reuseport) if config.port_tcp else None
    except OSError:
        if udp is not None:
            udp.close()
        raise
    return udp, tcp


def activated(config: Config) -> Sockets | None:
    """The control sockets passed by systemd (fastknockd.socket) that the config lists, or
    None without socket activation. Stealth first: a socket the config does not list (a
    TCP one for a ``5800 / udp`` server, another port, a second one of a kind) is closed
    with a warning, never served; a listed one that is missing refuses the start."""
    socks = systemd.listen_fds()
    if not socks:
        return None
    wanted = {socket.SOCK_DGRAM: config.port_udp, socket.SOCK_STREAM: config.port_tcp}
    names = {socket.SOCK_DGRAM: "udp", socket.SOCK_STREAM: "tcp"}
    got: dict[socket.SocketKind, socket.socket] = {}
    for sock in socks:
        try:
            port = (
                sock.getsockname()[1] if sock.family in (socket.AF_INET, socket.AF_INET6) else None
            )
        except OSError:
            port = None
        kind = sock.type
        if wanted.get(kind) and port == config.port and kind not in got:
            sock.setblocking(False)
            got[kind] = sock
            continue
        what = f"{names.get(kind, 'non-IP')} socket" + (f" on port {port}" if port else "")
        log.warning(
            "systemd passed a %s that the config does not list (%s serves %d/%s): closed",
            what, config.source, config.port,
            ",".join(n for k, n in names.items() if wanted[k]),
        )  # fmt: skip
        sock.close()
    missing = [f"{config.port}/{names[k]}" for k, on in wanted.items() if on and k not in got]
    if missing:
        for sock in got.values():
            sock.close()
        raise FastknockError(
            f"socket activation: the config lists {' and '.join(missing)} but systemd passed "
            "no such socket; make fastknockd.socket match [GENERAL] port (fastknock-install "
            "writes it from the config)"
        )
    return got.get(socket.SOCK_DGRAM), got.get(socket.SOCK_STREAM)
