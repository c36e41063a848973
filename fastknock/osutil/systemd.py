"""The two pieces of systemd integration the daemons use, without libsystemd:

- ``notify("READY=1")``: sd_notify(3) — one datagram to ``$NOTIFY_SOCKET`` (a path, or an
  abstract socket name starting with ``@``). Does nothing outside systemd.
- ``listen_fds()``: sd_listen_fds(3) — sockets passed by socket activation: ``LISTEN_PID``
  must be our PID, ``LISTEN_FDS`` counts them from fd 3. The variables are removed from the
  environment afterwards (as ``unset_environment=1``), and the fds are made close-on-exec.

- ``reloading(log, notify_systemd)``: the frame of both daemons' SIGHUP reload:
  RELOADING=1, the body, READY=1 whatever happened; a ``ConfigError`` or
  ``FirewallError`` from the body is logged and the old configuration stays.
- ``stopping(log, notify_systemd, message)``: the first step of both daemons' shutdown:
  log it, STOPPING=1.

``--no-systemd`` in both daemons skips the notifications (the variables are then ignored).
Tested for real with ``systemd-socket-activate`` (tests/test_hardening_e2e.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from fastknock.errors import ConfigError, FirewallError

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1", "STOPPING=1", "RELOADING=1") to systemd, if present."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed to this process (empty without socket activation)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


@contextlib.contextmanager
def reloading(log: logging.Logger, notify_systemd: bool) -> Iterator[None]:
    """Run a reload's body between RELOADING=1 and READY=1; a bad config changes nothing."""
    if notify_systemd:
        notify("RELOADING=1")
    try:
        yield
    except (ConfigError, FirewallError) as exc:
        log.error("reload failed, keeping the old configuration: %s", exc)
    finally:
        if notify_systemd:
            notify("READY=1")


def stopping(log: logging.Logger, notify_systemd: bool, message: str) -> None:
    """A daemon begins to shut down: say so in the log and to systemd."""
    log.info("%s", message)
    if notify_systemd:
        notify("STOPPING=1")
