"""fastknockfwd's end of the hook runner (``firewall.hookrun``): the account, the process, the
pipes.

Design
------
* ``hook_account``: ``[HOOKS] hook-user`` resolved at start-up; an account that does not
  exist, or has uid 0 or gid 0 (also as a supplementary group), is a configuration error:
  hooks never run as root.
* ``start_runner`` runs in ``fwd.main`` before ``asyncio.run``: no thread exists yet (a
  fork is safe), fastknockfwd is still root and its seccomp filter is not installed yet
  (after that no process can be made). Fork; in the child stdin /dev/null, then exec a
  fresh ``python -I`` on ``hookrun.py`` with ``PATH`` alone in its environment and the
  account's ids as arguments (the runner drops to them itself, see ``hookrun``): the two
  pipe ends are the only descriptors it inherits (every other fd is close-on-exec). The
  parent waits (at most ``READY_TIMEOUT``) for the runner's first report, so a runner
  that cannot start is a start-up error, not silence.
  fastknockfwd never waits for the runner's exit (``wait4`` is outside its seccomp list);
  a runner that died stays a zombie until fastknockfwd exits.
* ``HookFeed`` is fastknockfwd's side of both pipes, both non-blocking. ``send`` never
  blocks: records wait in a queue of at most ``MAX_PENDING`` records while the pipe is
  full (an event-loop writer drains it); beyond that, and once the runner is gone, a
  record is dropped and counted. ``poll_reports`` reads what the runner reported (called
  at most once a second by ``hooks.HookLeases``: a hostile runner cannot make fastknockfwd
  read more); a read that is not whole valid reports is counted and ignored; EOF means the
  runner is gone (logged once; hooks stay off until a restart: no new process can be
  made under the filter).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pwd
import select
import sys
import time

from fastknock.conf.model import HooksConfig
from fastknock.errors import ConfigError, FastknockError
from fastknock.firewall import hookrun

__all__ = [
    "MAX_PENDING",
    "HookAccount",
    "HookFeed",
    "commands",
    "hook_account",
    "start_runner",
    "wanted",
]

log = logging.getLogger("fastknockfwd")

MAX_PENDING = 1024  # records waiting for room in the pipe
READY_TIMEOUT = 30.0  # seconds for the runner to start (a loaded machine: Python start-up)
_REPORTS_PER_READ = 1024


class HookAccount:
    def __init__(self, name: str, uid: int, gid: int, groups: list[int]) -> None:
        self.name, self.uid, self.gid, self.groups = name, uid, gid, groups


def hook_account(name: str, source: str = "<config>") -> HookAccount:
    """``hook-user``'s ids; ConfigError (naming ``source``, the config file) if it does not
    exist or is root in any way."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"[HOOKS] hook-user: account {name!r} does not exist", source) from None
    groups = sorted(set(os.getgrouplist(name, pw.pw_gid)))
    if pw.pw_uid == 0 or pw.pw_gid == 0 or 0 in groups:
        raise ConfigError(
            f"[HOOKS] hook-user: account {name!r} has uid 0 or is in group 0: hooks never run "
            "as root",
            source,
        )
    return HookAccount(name, pw.pw_uid, pw.pw_gid, groups)


def wanted(cfg: HooksConfig | None) -> bool:
    """Whether ``cfg`` names a hook (only then is a runner started)."""
    return cfg is not None and (cfg.on_open is not None or cfg.on_close is not None)


def commands(cfg: HooksConfig | None) -> hookrun.Commands:
    if cfg is None:
        return hookrun.Commands(None, None, 10.0)
    return hookrun.Commands(cfg.on_open, cfg.on_close, cfg.timeout)


class HookFeed:
    """fastknockfwd's end of the runner's pipes (see the module header)."""

    def __init__(self, pid: int, cmd_fd: int, rep_fd: int, user: str) -> None:
        self.pid, self.cmd_fd, self.rep_fd, self.user = pid, cmd_fd, rep_fd, user
        os.set_blocking(cmd_fd, False)
        os.set_blocking(rep_fd, False)
        self.up = True
        self.queue: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of queue[0] already written
        self.sent = 0
        self.dropped = 0
        self.bad_reports = 0
        self.reports = 0  # valid reads
        self.runner: dict[str, int] = dict.fromkeys(hookrun.REPORT_FIELDS, 0)
        self._writer: asyncio.AbstractEventLoop | None = None

    def send(self, record: bytes) -> bool:
        """Queue ``record`` for the runner; False (counted) if it was dropped."""
        if not self.up or len(self.queue) >= MAX_PENDING:
            self.dropped += 1
            return False
        self.queue.append(record)
        self.sent += 1
        self.flush()
        return True

    def flush(self) -> None:
        """Write what fits; leave the rest to an event-loop writer (if a loop runs)."""
        while self.queue and self.up:
            head = self.queue[0]
            try:
                n = os.write(self.cmd_fd, memoryview(head)[self.offset :])
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: the runner is gone
                self._gone(f"cannot write to it ({exc.strerror})")
                break
            self.offset += n
            if self.offset == len(head):
                self.queue.popleft()
                self.offset = 0
        want = bool(self.queue) and self.up
        if want and self._writer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # before the loop: ``attach`` registers the writer
            loop.add_writer(self.cmd_fd, self.flush)
            self._writer = loop
        elif not want and self._writer is not None:
            self._writer.remove_writer(self.cmd_fd)
            self._writer = None

    def attach(self) -> None:
        """In the running loop: drain what waited since before it."""
        self.flush()

    def _gone(self, why: str) -> None:
        if self.up:
            log.error("hook runner (pid %d) is gone: %s; hooks are off until a restart",
                      self.pid, why)  # fmt: skip
        self.up = False
        self.dropped += len(self.queue)
        self.queue.clear()
        self.offset = 0

    def poll_reports(self) -> None:
        """Take the runner's newest valid report, if any (hostile input: only numbers)."""
        if not self.up:
            return
        try:
            data = os.read(self.rep_fd, hookrun.REPORT.size * _REPORTS_PER_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(f"cannot read its reports ({exc.strerror})")
            return
        if not data:
            self._gone("it exited")
            return
        size = hookrun.REPORT.size
        reports = [hookrun.decode_report(data[i : i + size]) for i in range(0, len(data), size)]
        if len(data) % size or any(r is None for r in reports):
            self.bad_reports += 1
            return
        last = reports[-1]
        assert last is not None
        self.runner = last
        self.reports += 1

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block (start-up only) until the runner's first report; FastknockError if none."""
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.rep_fd, select.POLLIN)
        while (left := end - time.monotonic()) > 0:
            if not poller.poll(int(left * 1000) + 1):
                continue
            self.poll_reports()
            if not self.up:
                break
            if self.reports:
                return
        raise FastknockError(
            f"the hook runner (pid {self.pid}, account {self.user!r}) did not start: see its "
            "message above"
        )

    def close(self) -> None:
        """At exit: the runner sees EOF, finishes what it holds and exits."""
        self.flush()
        if self.queue and self.up:
            log.warning("%d hook event(s) not delivered at exit (the runner is behind)",
                        len(self.queue))  # fmt: skip
            self.dropped += len(self.queue)
            self.queue.clear()
        if self._writer is not None:
            self._writer.remove_writer(self.cmd_fd)
            self._writer = None
        for fd in (self.cmd_fd, self.rep_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.up = False


def start_runner(account: HookAccount, cfg: HooksConfig) -> HookFeed:
    """Fork and exec the runner as ``account``; send it ``cfg``; wait until it runs."""
    script = hookrun.__file__
    cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
    rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
    ids = [str(account.uid), str(account.gid), ",".join(map(str, account.groups))]
    argv = [sys.executable, "-I", "-B", script, str(cmd_r), str(rep_w), *ids]
    pid = os.fork()
    if pid == 0:  # the child: no Python-level clean-up, only exec or _exit
        try:
            os.set_inheritable(cmd_r, True)
            os.set_inheritable(rep_w, True)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.execve(sys.executable, argv, {"PATH": hookrun.MIN_PATH})  # noqa: S606
        except BaseException as exc:  # noqa: BLE001 -- report and leave, whatever it was
            try:
                os.write(2, f"fastknockfwd: hook runner: cannot start: {exc}\n".encode())
            finally:
                os._exit(127)
    os.close(cmd_r)
    os.close(rep_w)
    feed = HookFeed(pid, cmd_w, rep_r, account.name)
    try:
        feed.send(hookrun.encode_config(commands(cfg)))
        feed.wait_ready()
    except BaseException:
        feed.close()
        raise
    log.info("hook runner started (pid %d, account %s uid %d)", pid, account.name, account.uid)
    return feed
