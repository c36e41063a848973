"""The hook runner: the small process that runs ``[HOOKS]`` programs for fastknockfwd.

Design
------
* Why a process of its own: fastknockfwd's seccomp filter forbids fork and exec, it keeps
  CAP_NET_ADMIN, and its event loop must never wait for a hook. So fastknockfwd starts this
  runner once, before its filter goes in (``firewall.hookproc``): forked and exec'd as
  ``python -I <this file> CMD_FD REPORT_FD UID GID GROUPS`` with an environment of
  ``PATH`` alone, stdin /dev/null. A fresh interpreter holds nothing of fastknockfwd's
  memory (no config text, no key). It starts as root because the Python installation may
  be readable by root only (e.g. under a 0700 /root); its first act, once the modules it
  uses are loaded, is to become the ``hook-user`` account for good (groups, gid, uid).
  Then it refuses to go on as uid/gid 0 or with any capability left, and sets
  ``PR_SET_NO_NEW_PRIVS``: neither it nor a hook can gain privileges (a setuid ``sudo`` in
  a hook does not elevate).
* Stdlib only: it runs with ``-I`` (no PYTHONPATH, no user site, not its own directory on
  ``sys.path``), so it imports nothing of fastknock; fastknockfwd imports this module for
  the codec below: one definition for both ends (``tests/test_hooks_runner.py`` checks the
  imports).
* Input (fastknockfwd -> runner, CMD_FD): records ``u32be length || body``. Body type 1,
  CONFIG: JSON ``{"on_open": [argv] | null, "on_close": [argv] | null, "timeout": s}``
  (the first record, and again on each reload). Type 2, EVENT: ``event (1 open, 2 close),
  user u32, resource u32, lease timeout u32, u8 len || address, u8 len || port``, every
  field validated on decoding (an address or ``NET/N``; ``N``, ``A-B`` or empty). A record
  that does not decode is logged and the rest of that read dropped.
* Running: at most ``MAX_RUNNING`` hooks at once and ``MAX_QUEUED`` events held (running
  plus waiting); beyond that an event is dropped and counted. Events of one knock-lease
  (user, resource, address) run in order, one at a time. Each hook: no shell, ``cwd /``,
  its own session (process group), stdout to /dev/null, stderr to ours (the journal), and
  exactly this environment: ``FASTKNOCK_EVENT FASTKNOCK_USER FASTKNOCK_RESOURCE
  FASTKNOCK_ADDRESS FASTKNOCK_PORT FASTKNOCK_TIMEOUT PATH``. After ``hook-timeout`` seconds
  its process group gets SIGKILL (counted as a timeout); when the hook exits, whatever it
  left in its process group is killed too (before it is reaped, so the group id cannot be
  a new process's). Exit status 0 counts as ok, anything else as failed (logged).
* Output (runner -> fastknockfwd, REPORT_FD, non-blocking): fixed 48-byte reports of its
  cumulative counters (started, ok, failed, timed_out, dropped), after every change and
  once at start-up ("ready"). fastknockfwd reads them at most once a second and treats
  them as hostile numbers. A full pipe only delays a report (the newest is resent).
* End: EOF on CMD_FD (fastknockfwd stopped): the runner finishes what it holds (each hook
  still bounded by its timeout) and exits.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import ipaddress
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_RUNNING = 4
MAX_QUEUED = 256
MAX_RECORD = 64 * 1024
OPEN, CLOSE = 1, 2
EVENT_NAMES = {OPEN: "open", CLOSE: "close"}
_LEN = struct.Struct(">I")
_CONFIG, _EVENT = 1, 2
_EV = struct.Struct(">BBIII")
REPORT = struct.Struct(">4sB3x5Q")
REPORT_MAGIC = b"FKHR"
REPORT_FIELDS = ("started", "ok", "failed", "timed_out", "dropped")
_PORT = re.compile(r"(?:[0-9]{1,5}(?:-[0-9]{1,5})?)?")


class RecordError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Event:
    event: int  # OPEN | CLOSE
    user: int
    resource: int
    address: str  # "203.0.113.7" or "203.0.113.0/24"
    port: str  # "22", "60000-61000" or "" (jump resource)
    timeout: int  # the lease's timeout, seconds

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.user, self.resource, self.address)

    def env(self) -> dict[str, str]:
        """The hook's whole environment."""
        return {
            "FASTKNOCK_EVENT": EVENT_NAMES[self.event],
            "FASTKNOCK_USER": f"{self.user:08X}",
            "FASTKNOCK_RESOURCE": f"{self.resource:08X}",
            "FASTKNOCK_ADDRESS": self.address,
            "FASTKNOCK_PORT": self.port,
            "FASTKNOCK_TIMEOUT": str(self.timeout),
            "PATH": MIN_PATH,
        }


@dataclass(frozen=True, slots=True)
class Commands:
    on_open: tuple[str, ...] | None
    on_close: tuple[str, ...] | None
    timeout: float

    def argv(self, event: int) -> tuple[str, ...] | None:
        return self.on_open if event == OPEN else self.on_close


# -- the codec ---------------------------------------------------------------------------------


def _check_address(text: str) -> None:
    try:
        if "/" in text:
            ipaddress.ip_network(text, strict=True)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        raise RecordError("bad address") from None


def _check_port(text: str) -> None:
    if not _PORT.fullmatch(text):
        raise RecordError("bad port")
    bounds = [int(p) for p in text.split("-")] if text else []
    if any(not 0 < p <= 0xFFFF for p in bounds) or (len(bounds) == 2 and bounds[0] > bounds[1]):
        raise RecordError("port out of range")


def encode_event(ev: Event) -> bytes:
    _check_address(ev.address)
    _check_port(ev.port)
    if ev.event not in EVENT_NAMES:
        raise RecordError("bad event")
    addr, port = ev.address.encode("ascii"), ev.port.encode("ascii")
    body = _EV.pack(_EVENT, ev.event, ev.user, ev.resource, min(ev.timeout, 0xFFFFFFFF))
    body += bytes([len(addr)]) + addr + bytes([len(port)]) + port
    return _LEN.pack(len(body)) + body


def encode_config(cmds: Commands) -> bytes:
    data = {"on_open": cmds.on_open, "on_close": cmds.on_close, "timeout": cmds.timeout}
    body = bytes([_CONFIG]) + json.dumps(data).encode()
    if len(body) > MAX_RECORD:
        raise RecordError("config record too large")
    return _LEN.pack(len(body)) + body


def _argv(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(w, str) and "\0" not in w for w in value)
        or not value[0].startswith("/")
    ):
        raise RecordError("bad command")
    return tuple(value)


def decode_body(body: bytes) -> Event | Commands:
    """One record's body; raises RecordError on anything malformed."""
    if not body:
        raise RecordError("empty record")
    if body[0] == _CONFIG:
        try:
            data = json.loads(body[1:].decode())
        except (UnicodeDecodeError, ValueError):
            raise RecordError("bad config record") from None
        if not isinstance(data, dict) or set(data) != {"on_open", "on_close", "timeout"}:
            raise RecordError("bad config record")
        timeout = data["timeout"]
        if not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
            raise RecordError("bad hook timeout")
        return Commands(_argv(data["on_open"]), _argv(data["on_close"]), float(timeout))
    if body[0] != _EVENT or len(body) < _EV.size + 2:
        raise RecordError("bad record type or size")
    _, event, user, resource, timeout = _EV.unpack_from(body)
    if event not in EVENT_NAMES:
        raise RecordError("bad event")
    pos = _EV.size
    texts = []
    for _ in range(2):
        if pos >= len(body):
            raise RecordError("truncated record")
        n = body[pos]
        text = body[pos + 1 : pos + 1 + n]
        if len(text) != n:
            raise RecordError("truncated record")
        try:
            texts.append(text.decode("ascii"))
        except UnicodeDecodeError:
            raise RecordError("non-ASCII field") from None
        pos += 1 + n
    if pos != len(body):
        raise RecordError("trailing bytes")
    _check_address(texts[0])
    _check_port(texts[1])
    return Event(event, user, resource, texts[0], texts[1], timeout)


def split_records(buf: bytearray) -> list[bytes]:
    """Take the complete records' bodies off the front of ``buf``."""
    out = []
    while len(buf) >= _LEN.size:
        (n,) = _LEN.unpack_from(buf)
        if n > MAX_RECORD:
            raise RecordError("record too large")
        if len(buf) < _LEN.size + n:
            break
        out.append(bytes(buf[_LEN.size : _LEN.size + n]))
        del buf[: _LEN.size + n]
    return out


def encode_report(counts: dict[str, int]) -> bytes:
    return REPORT.pack(REPORT_MAGIC, 1, *(counts[k] for k in REPORT_FIELDS))


def decode_report(data: bytes) -> dict[str, int] | None:
    """One report, or None if it is not one."""
    if len(data) != REPORT.size:
        return None
    magic, version, *values = REPORT.unpack(data)
    if magic != REPORT_MAGIC or version != 1:
        return None
    return dict(zip(REPORT_FIELDS, values, strict=True))


# -- the runner process ------------------------------------------------------------------------


def _log(msg: str) -> None:
    try:
        os.write(2, f"fastknockfwd-hooks[{os.getpid()}]: {msg}\n".encode(errors="replace"))
    except OSError:
        pass


@dataclass
class _Job:
    event: Event
    proc: subprocess.Popen[bytes]
    deadline: float
    pidfd: int


def _spawn(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv), env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        close_fds=True, start_new_session=True,
    )  # fmt: skip


class Runner:
    def __init__(self, cmd_fd: int, rep_fd: int, clock: Callable[[], float] = time.monotonic):
        self.cmd_fd, self.rep_fd, self.clock = cmd_fd, rep_fd, clock
        self.counts = dict.fromkeys(REPORT_FIELDS, 0)
        self.commands: Commands | None = None
        self.pending: collections.deque[Event] = collections.deque()
        self.jobs: dict[int, _Job] = {}  # pidfd -> job
        self.busy: set[tuple[int, int, str]] = set()
        self.buf = bytearray()
        self.dirty = True  # the first report says "ready"
        self.eof = False
        self.poller = select.poll()
        self.poller.register(cmd_fd, select.POLLIN)

    # -- input

    def feed(self, data: bytes) -> None:
        self.buf += data
        try:
            bodies = split_records(self.buf)
            for body in bodies:
                self.accept(decode_body(body))
        except RecordError as exc:
            _log(f"error: dropped a malformed record from fastknockfwd ({exc})")
            self.buf.clear()

    def accept(self, rec: Event | Commands) -> None:
        if isinstance(rec, Commands):
            self.commands = rec
            for argv in (rec.on_open, rec.on_close):
                if argv is not None and not os.access(argv[0], os.X_OK):
                    _log(f"warning: {argv[0]!r} is not executable for uid {os.getuid()}")
            return
        if self.commands is None or self.commands.argv(rec.event) is None:
            return  # no hook for this event
        if len(self.pending) + len(self.jobs) >= MAX_QUEUED:
            self.counts["dropped"] += 1
            self.dirty = True
            if self.counts["dropped"] in (1, 10, 100) or self.counts["dropped"] % 1000 == 0:
                _log(f"warning: {self.counts['dropped']} event(s) dropped: hooks too slow")
            return
        self.pending.append(rec)

    # -- hooks

    def start_ready(self) -> None:
        """Start waiting events, in order, skipping leases whose previous hook still runs."""
        if self.commands is None:
            return
        kept: collections.deque[Event] = collections.deque()
        blocked: set[tuple[int, int, str]] = set()
        while self.pending:
            ev = self.pending.popleft()
            if len(self.jobs) >= MAX_RUNNING or ev.key in self.busy or ev.key in blocked:
                blocked.add(ev.key)  # later events of this lease wait behind it
                kept.append(ev)
                continue
            self.start(ev)
        self.pending = kept

    def start(self, ev: Event) -> None:
        assert self.commands is not None
        argv = self.commands.argv(ev.event)
        if argv is None:
            return
        self.counts["started"] += 1
        self.dirty = True
        name = f"on-{EVENT_NAMES[ev.event]}"
        try:
            proc = _spawn(argv, ev.env())
        except OSError as exc:
            self.counts["failed"] += 1
            _log(f"warning: {name} hook {argv[0]!r} could not start: {exc.strerror}")
            return
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = -proc.pid  # no pidfd: polled (negative keys never clash with fds)
        else:
            self.poller.register(pidfd, select.POLLIN)
        self.jobs[pidfd] = _Job(ev, proc, self.clock() + self.commands.timeout, pidfd)
        self.busy.add(ev.key)

    def finish(self, job: _Job, timed_out: bool) -> None:
        pid = job.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)  # the group, before the leader is reaped
        except OSError:
            pass
        code = job.proc.wait()
        if job.pidfd >= 0:
            self.poller.unregister(job.pidfd)
            os.close(job.pidfd)
        del self.jobs[job.pidfd]
        self.busy.discard(job.event.key)
        self.dirty = True
        name = f"on-{EVENT_NAMES[job.event.event]}"
        if timed_out:
            self.counts["timed_out"] += 1
            assert self.commands is not None
            _log(f"warning: {name} hook (pid {pid}) killed after {self.commands.timeout:g} s")
        elif code == 0:
            self.counts["ok"] += 1
        else:
            self.counts["failed"] += 1
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            _log(f"warning: {name} hook (pid {pid}) failed: {why}")

    # -- the loop

    def report(self) -> None:
        if not self.dirty:
            return
        try:
            os.write(self.rep_fd, encode_report(self.counts))
        except BlockingIOError:
            return  # full: resent on a later round
        except OSError:
            pass  # fastknockfwd is gone: nobody to tell
        self.dirty = False

    def wait_ms(self) -> int:
        waits = [job.deadline - self.clock() for job in self.jobs.values()]
        if any(pidfd < 0 for pidfd in self.jobs):
            waits.append(0.05)
        if self.dirty:
            waits.append(0.5)
        return -1 if not waits else max(int(min(waits) * 1000) + 1, 0)

    def step(self) -> None:
        for fd, _ in self.poller.poll(self.wait_ms()):
            if fd == self.cmd_fd:
                try:
                    data = os.read(self.cmd_fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    self.eof = True
                    self.poller.unregister(self.cmd_fd)
                else:
                    self.feed(data)
            elif fd in self.jobs:
                self.finish(self.jobs[fd], False)
        now = self.clock()
        for job in list(self.jobs.values()):
            if job.pidfd < 0 and job.proc.poll() is not None:
                self.finish(job, False)
            elif job.deadline <= now:
                self.finish(job, True)
        self.start_ready()
        self.report()

    def run(self) -> None:
        while not (self.eof and not self.pending and not self.jobs):
            self.step()
        self.dirty = True
        self.report()


def _become(uid: int, gid: int, groups: list[int]) -> None:
    """Become the hook account for good (if root: the exec'd runner)."""
    if os.geteuid() == 0:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.chdir("/")


def _unprivileged() -> str | None:
    """Why this process may not run hooks (root, a capability), or None. Sets no_new_privs."""
    if 0 in os.getresuid() or 0 in os.getresgid():
        return "refusing to run hooks as uid or gid 0"
    with open("/proc/self/status") as f:
        caps = {k: int(v, 16) for k, _, v in (ln.partition(":") for ln in f) if k in
                ("CapPrm", "CapEff", "CapAmb")}  # fmt: skip
    if any(caps.values()) or len(caps) != 3:
        return "refusing to run hooks with capabilities"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
    return None


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, lambda *_: None)  # a terminal's ^C is for fastknockfwd
    if len(argv) != 5 or not all(a.replace(",", "").isdigit() for a in argv):
        _log("usage: hookrun.py CMD_FD REPORT_FD UID GID GROUPS (started by fastknockfwd)")
        return 2
    try:
        _become(int(argv[2]), int(argv[3]), [int(g) for g in argv[4].split(",") if g])
    except OSError as exc:
        _log(f"error: cannot become uid {argv[2]}: {exc}")
        return 2
    why = _unprivileged()
    if why is not None:
        _log(f"error: {why}")
        return 2
    cmd_fd, rep_fd = int(argv[0]), int(argv[1])
    os.set_blocking(rep_fd, False)
    for fd in (cmd_fd, rep_fd):
        os.set_inheritable(fd, False)
    try:
        Runner(cmd_fd, rep_fd).run()
    except OSError as exc:
        if exc.errno != errno.EINTR:
            _log(f"error: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
