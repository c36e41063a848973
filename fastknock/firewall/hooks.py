"""Which hook events fastknockfwd fires, and the record of open knock-leases that makes
``on-close`` survive a restart.

Design
------
* A *knock-lease* is what one knock opens: (user, resource, knocker address). Hooks fire
  per knock-lease, not per kernel element: two users in one ``ipv4-prefix: 24`` each get
  their own ``on-open`` (same FASTKNOCK_ADDRESS, the /24) and later their own ``on-close``;
  one user's revoke closes that user's knock-lease only, whatever the kernel still holds
  for the other. ``HookLeases.open`` maps each live knock-lease to its deadline.
* Events come from the daemon's answers (``acked``), so only what is in the kernel counts:
  an install ACK (the nft transaction succeeded) of a knock-lease not already open fires
  ``on-open``; one already open (a re-knock) only moves its deadline. A revoke ACK of an
  open knock-lease fires ``on-close`` (a revoke of nothing fires nothing). Expiry:
  ``tick`` (every ``TICK`` seconds) fires ``on-close`` for knock-leases past their
  deadline, computed as the kernel's is (ACK time + the resource's timeout), so it comes
  just after the kernel dropped a port lease; for a jump lease it comes in the same tick
  as the daemon's sweep, so possibly a transaction's time before the rule is gone.
* FASTKNOCK_ADDRESS and FASTKNOCK_PORT are made in one place, ``target``, from the
  resource as configured (the prefix, the port range) at open time, and kept with the
  knock-lease: an ``on-close`` says what its ``on-open`` said, also after a reload.
* The record (``--statedir``/``hook-leases.json``, written only when something changed, at
  most every ``SAVE_INTERVAL`` seconds, in a thread, through a new file and a rename
  relative to the directory's fd): the open knock-leases with their deadlines and the
  kernel's boot id (a crash loses at most the last ``SAVE_INTERVAL`` of changes). At
  start-up, knock-leases whose deadline passed while fastknockfwd was
  stopped, and every one from an earlier boot (the kernel lost its leases), fire
  ``on-close``; the rest stay open. The file belongs to fastknockfwd's own account and is
  hostile input: opened ``O_NOFOLLOW | O_NONBLOCK`` relative to the directory, a regular
  file with one link of at most ``MAX_RECORD_BYTES``, every field checked; anything else
  is logged and the daemon starts with no open knock-leases.
* Bounded: at most ``MAX_TRACKED`` knock-leases (beyond that a new one fires nothing and
  is counted ``untracked``). The runner and its queues are ``hookproc``/``hookrun``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from fastknock.addr import IPAddress
from fastknock.conf.model import Config, HooksConfig, PortResource, Resource
from fastknock.firewall import hookproc, hookrun
from fastknock.firewall.leases import port_text, source
from fastknock.ipc import FwOp, FwRequest
from fastknock.osutil import runfiles

__all__ = ["RECORD_NAME", "HookLeases", "Lease", "boot_id", "list_record", "load_record",
           "target"]  # fmt: skip

log = logging.getLogger("fastknockfwd")

RECORD_NAME = "hook-leases.json"
MAX_RECORD_BYTES = 16 * 1024 * 1024
MAX_TRACKED = 65536
TICK = 0.25
SAVE_INTERVAL = 0.5
REPORT_INTERVAL = 1.0

Key = tuple[int, int, str]  # user, resource, knocker address


def target(resource: Resource, addr: IPAddress) -> tuple[str, str]:
    """FASTKNOCK_ADDRESS and FASTKNOCK_PORT of a knock from ``addr`` for ``resource``: the
    address, or ``NET/N`` when the resource opens a shorter prefix; the port, ``A-B`` for a
    range, empty for a jump resource."""
    subject = str(source(addr, resource.ipv4_prefix, resource.ipv6_prefix))
    if not isinstance(resource, PortResource):
        return subject, ""
    return subject, port_text(resource.port, resource.port_last)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class Lease:
    """An open knock-lease as the hooks know it."""

    user: int
    resource: int
    addr: str  # the knocker's address
    subject: str  # FASTKNOCK_ADDRESS
    port: str  # FASTKNOCK_PORT
    timeout: int  # FASTKNOCK_TIMEOUT: the lease's timeout, seconds
    deadline: float  # Unix time

    @property
    def key(self) -> Key:
        return (self.user, self.resource, self.addr)

    def event(self, kind: int) -> hookrun.Event:
        return hookrun.Event(kind, self.user, self.resource, self.subject, self.port,
                             self.timeout)  # fmt: skip


def _lease(obj: object) -> Lease:
    """One record entry, checked field by field (ValueError if anything is off)."""
    if not isinstance(obj, dict) or set(obj) != set(Lease.__slots__):
        raise ValueError("bad entry")
    ints = [obj[k] for k in ("user", "resource", "timeout")]
    if not all(type(v) is int and 0 <= v <= 0xFFFFFFFF for v in ints):
        raise ValueError("bad number")
    deadline = obj["deadline"]
    if type(deadline) not in (int, float) or not math.isfinite(deadline) or deadline < 0:
        raise ValueError("bad deadline")
    if not all(isinstance(obj[k], str) for k in ("addr", "subject", "port")):
        raise ValueError("bad text")
    ipaddress.ip_address(obj["addr"])
    lease = Lease(**obj)
    hookrun.encode_event(lease.event(hookrun.OPEN))  # address/port as the runner takes them
    return lease


def load_record(dir_fd: int) -> tuple[str, list[Lease]]:
    """(boot id, leases) from the record in the directory ``dir_fd``; ValueError/OSError
    says why it is unusable."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(RECORD_NAME, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ValueError("not a regular file with one link")
        if st.st_size > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RECORD_BYTES:
                raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    finally:
        os.close(fd)
    data = json.loads(b"".join(chunks).decode("utf-8"))
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) != {
        "version", "boot_id", "leases"
    }:  # fmt: skip
        raise ValueError("not a version 1 record")
    if not isinstance(data["boot_id"], str) or not isinstance(data["leases"], list):
        raise ValueError("bad record")
    if len(data["leases"]) > MAX_TRACKED:
        raise ValueError(f"more than {MAX_TRACKED} leases")
    return data["boot_id"], [_lease(x) for x in data["leases"]]


def save_record(directory: runfiles.RunDir, boot: str, leases: list[Lease]) -> None:
    text = json.dumps({"version": 1, "boot_id": boot, "leases": [asdict(x) for x in leases]})
    tmp = RECORD_NAME + ".new"
    fd = directory.create(tmp, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, RECORD_NAME, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)


def list_record(statedir: str) -> list[str]:
    """``fastknockfwd --list``: the open knock-leases the record holds (as root: the
    directory is opened ``O_NOFOLLOW``, the file as in ``restore``)."""
    try:
        fd = os.open(statedir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return [f"no hook lease record ({statedir}: {exc.strerror})"]
    try:
        boot, leases = load_record(fd)
    except (OSError, ValueError, RecursionError) as exc:
        return [f"no usable hook lease record in {statedir} ({type(exc).__name__})"]
    finally:
        os.close(fd)
    now = time.time()
    rows = [f"{len(leases)} knock-lease(s) open for the hooks"
            + (" (recorded before a reboot)" if boot != boot_id() else "")]  # fmt: skip
    for x in sorted(leases, key=lambda x: x.key):
        left = f"{max(x.deadline - now, 0):.0f}s"
        rows.append(f"{x.subject:<40} user {x.user:08X} res {x.resource:08X} "
                    f"port {x.port or '-':<12} {left}")  # fmt: skip
    return rows


class HookLeases:
    """Knock-lease events for the hook runner (see the module header)."""

    def __init__(
        self,
        feed: hookproc.HookFeed,
        statedir: runfiles.RunDir | None,
        clock: Callable[[], float] = time.time,
        boot: str | None = None,
    ) -> None:
        self.feed, self.statedir, self.clock = feed, statedir, clock
        self.boot = boot_id() if boot is None else boot
        self.open: dict[Key, Lease] = {}
        self.counts: Counter[str] = Counter()
        self.dirty = False
        self._saving = False

    # -- events

    def _fire(self, lease: Lease, kind: int) -> None:
        self.counts["open" if kind == hookrun.OPEN else "close"] += 1
        self.feed.send(hookrun.encode_event(lease.event(kind)))

    def acked(self, req: FwRequest, cfg: Config) -> None:
        """fastknockfwd answered ``req`` ACK: fire what that means for the hooks."""
        key: Key = (req.user, req.resource, str(req.addr))
        now = self.clock()
        old = self.open.get(key)
        if old is not None and old.deadline <= now:  # expired, not yet ticked
            self._close(old)
            old = None
        if req.op == FwOp.REVOKE:
            if old is not None:
                self._close(old)
            return
        res = cfg.resources.get(req.resource)
        if res is None or cfg.nftables is None:
            return
        timeout = res.timeout if res.timeout is not None else cfg.nftables.timeout
        if old is not None:  # a re-knock: the lease was refreshed, not opened
            self.open[key] = Lease(**{**asdict(old), "deadline": now + timeout})
            self.dirty = True
            return
        if len(self.open) >= MAX_TRACKED:
            self.counts["untracked"] += 1
            return
        subject, port = target(res, req.addr)
        lease = Lease(req.user, req.resource, key[2], subject, port, timeout, now + timeout)
        self.open[key] = lease
        self.dirty = True
        self._fire(lease, hookrun.OPEN)

    def _close(self, lease: Lease) -> None:
        del self.open[lease.key]
        self.dirty = True
        self._fire(lease, hookrun.CLOSE)

    def expire(self) -> None:
        now = self.clock()
        for lease in [x for x in self.open.values() if x.deadline <= now]:
            self._close(lease)

    def reconfigure(self, cfg: HooksConfig | None) -> None:
        """A reload: new commands and timeout for the running runner."""
        if cfg is not None and cfg.user != self.feed.user:
            log.warning("[HOOKS] hook-user changed to %r: that takes a restart; hooks keep "
                        "running as %r", cfg.user, self.feed.user)  # fmt: skip
        self.feed.send(hookrun.encode_config(hookproc.commands(cfg)))

    # -- the record

    def restore(self) -> None:
        """At start-up: read the record; close what closed while we were stopped."""
        if self.statedir is None:
            return
        where = self.statedir.join(RECORD_NAME)
        try:
            boot, leases = load_record(self.statedir.fd)
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:  # hostile: say why, safely
            why = ascii(str(exc) or type(exc).__name__)[1:-1][:200]
            log.warning("ignoring the hook lease record %s (%s): starting with no open "
                        "knock-leases", where, why)  # fmt: skip
            self.dirty = True
            return
        for lease in leases:
            self.open[lease.key] = lease
        rebooted = boot != self.boot
        now = self.clock()
        gone = [x for x in self.open.values() if rebooted or x.deadline <= now]
        for lease in gone:
            self._close(lease)
        log.info("hook lease record: %d open, %d closed while stopped%s", len(self.open),
                 len(gone), " (rebooted)" if rebooted and gone else "")  # fmt: skip

    def save(self) -> None:
        if self.statedir is None:
            return
        save_record(self.statedir, self.boot, list(self.open.values()))

    async def _save(self) -> None:
        self.dirty = False
        self._saving = True
        try:
            await asyncio.to_thread(self.save)
        except OSError as exc:
            log.warning("cannot write the hook lease record: %s", exc)
            self.dirty = True
        finally:
            self._saving = False

    # -- the periodic task

    async def run(self) -> None:
        """Expiry every TICK, the runner's reports every REPORT_INTERVAL, the record when
        it changed (at most every SAVE_INTERVAL)."""
        self.feed.attach()
        last_report = last_save = 0.0
        while True:
            self.expire()
            mono = time.monotonic()
            if mono - last_report >= REPORT_INTERVAL:
                self.feed.poll_reports()
                last_report = mono
            if self.dirty and not self._saving and mono - last_save >= SAVE_INTERVAL:
                last_save = mono
                asyncio.get_running_loop().create_task(self._save())
            await asyncio.sleep(TICK)

    async def stop(self) -> None:
        """At exit: the last record (after a save in flight: one writer at a time), then
        EOF to the runner."""
        while self._saving:
            await asyncio.sleep(0.01)
        if self.dirty and self.statedir is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.save)
        self.feed.close()

    # -- counters

    def stats(self) -> dict[str, int]:
        r, f = self.feed.runner, self.feed
        return {
            "hook_opens": self.counts["open"],
            "hook_closes": self.counts["close"],
            "hook_leases": len(self.open),
            "hook_dropped": f.dropped + r["dropped"],
            "hook_ok": r["ok"],
            "hook_failed": r["failed"],
            "hook_timed_out": r["timed_out"],
        }

    def metric_stats(self) -> dict[str, int]:
        """Everything ``metrics.hook_families`` shows."""
        f = self.feed
        return {
            **self.stats(),
            "hook_dropped_daemon": f.dropped,
            "hook_dropped_runner": f.runner["dropped"],
            "hook_started": f.runner["started"],
            "hook_untracked": self.counts["untracked"],
            "hook_bad_reports": f.bad_reports,
            "hook_runner_up": int(f.up),
        }
