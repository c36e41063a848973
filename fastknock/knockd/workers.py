"""``fastknockd --workers N``: N receive processes on one SO_REUSEPORT socket group.

Design
------
* The parent binds every worker's sockets first (``SO_REUSEPORT`` on each, so the kernel
  spreads datagrams and connections over the group), then forks the workers; each keeps its
  own sockets and closes the others'. Binding before forking makes a taken port fail at
  once, in the parent, with one error message.
* The kernel picks a UDP socket of the group by a hash of the source and destination
  address and port, so all datagrams of one control session reach the same worker; session
  state, limits (``-n``/``-N`` apply per worker) and counters are per worker. All workers
  share the one fastknockfwd (it batches their requests together).
* The parent only supervises: SIGTERM/SIGINT are passed on to the workers; when a worker
  exits on its own, the others are stopped too and the parent exits with its status
  (a service manager restarts the whole group). SIGHUP is passed on too (every worker
  reloads its config). Signals are blocked across the forks, so none can arrive between a
  fork and the handlers being in place.
* SIGHUP must never kill a process of the group while it starts: the caller installs its
  SIGHUP handler *before* ``supervise`` (fastknockd's records "reload when serving"); each
  worker keeps that inherited handler until its event loop takes over (only SIGTERM/SIGINT
  are reset to the default there), and a SIGHUP the parent took before its forwarding
  handler was in place (``hup_pending``) is forwarded once the workers exist.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

log = logging.getLogger("fastknockd")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FORWARD = (signal.SIGHUP,)  # passed on without stopping: every worker reloads its config


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def supervise(
    n: int, child: Callable[[int], int], hup_pending: Callable[[], bool] = lambda: False
) -> int:
    """Fork ``n`` workers running ``child(index)`` (its return value is the worker's exit
    status) and wait for all of them. Returns the first non-zero status, else 0.
    ``hup_pending()``: whether a SIGHUP arrived before the forwarding handler (it is then
    passed on to the workers)."""
    if n < 1:
        raise ValueError("at least one worker")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS + _FORWARD)
    pids: dict[int, int] = {}
    try:
        for index in range(n):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker
                rc = 1
                try:
                    for sig in _SIGNALS:  # SIGHUP keeps the caller's start-up handler
                        signal.signal(sig, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    rc = child(index)
                except BaseException:  # a worker must never return into main()
                    log.exception("worker %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(rc)
            pids[pid] = index
    except BaseException:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def forward(signum: int, _frame: object) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, stop) for sig in _SIGNALS}
    previous.update({sig: signal.signal(sig, forward) for sig in _FORWARD})
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if hup_pending():
        forward(signal.SIGHUP, None)
    log.info("%d workers started: pids %s", n, " ".join(map(str, pids)))
    result = 0
    try:
        while pids:
            pid, wait_status = os.waitpid(-1, 0)
            if pid not in pids:
                continue
            index = pids.pop(pid)
            rc = _status(wait_status)
            if rc and not result:
                result = rc
            if not stopping:
                log.error("worker %d (pid %d) exited with status %d: stopping all", index, pid, rc)
                stopping = True
                for other in pids:
                    os.kill(other, signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result
