"""fastknockfwd: the privileged firewall daemon (the only part of fastknock that runs as root).

Design
------
fastknockd (unprivileged, network-facing) asks over a Unix socket for "install lease" or
"revoke lease" (``fwproto``); this daemon checks the request against its own copy of the
config and turns it into nftables changes (``nft``). It imports only config, errors,
fwproto and nft: little code runs as root.

- Socket ``RUNDIR/fastknockfwd/fastknockfwd.sock``, 0660 root:<server group>, in a 0750
  directory; PID file next to it. A peer must show the server account's uid *and* gid in
  SO_PEERCRED (``--test-mode`` also admits root), else it gets NOT_PERMITTED.
- One request per connection, read with ``control-timeout``: short, slow or silent peers
  are dropped, malformed ones get MALFORMED; neither affects other connections.
- Checks, in order: config checksum, address (not all-zero/all-ones, family supported by
  the nftables family), resource known, user known and allowed, port not 0 and not the
  control port, then the lease cap. IPv4-mapped IPv6 addresses are IPv4.
- Batching: validated requests join a queue. One worker coroutine takes *everything*
  queued, plans it (cap check, one change per lease key; the last change to a key wins)
  and applies it as one nftables transaction in a thread, so the event loop keeps
  accepting and queueing while a transaction is in flight. Each requester gets its own
  ACK/NACK; a failing batch is retried item by item (``nft.Firewall.apply``).
- Cap: ``max-nr-rules`` counts live lease entries (a tcp,udp port lease counts 2, a jump
  lease 1 per chain), not the static/control-port rules. The count starts from what the
  kernel holds at start-up and is re-read from the kernel before refusing anything; a
  refresh of a live lease needs no new room. Revoking a missing lease is ACK.
- Expiry: port leases expire in the kernel. Jump leases are per-lease rules whose deadline
  is in their comment; a sweeper removes them when due (also after a restart).
- SIGTERM/SIGINT: stop accepting, finish the batch in flight, remove socket and PID file,
  exit 0. Leases stay in the kernel (see ``nft``'s header for how an admin flushes them).
- Counters (``Daemon.stats``) are logged per transaction with ``-v``, on SIGUSR1 and at
  exit (``stats: requests=... transactions=...``), and with ``--metrics-file`` written in
  Prometheus text format every ``--metrics-interval`` seconds (``metrics``: stdlib only).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import pwd
import resource as rlimit
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fastknock import ipc
from fastknock.conf import config as configmod
from fastknock.conf import permissions
from fastknock.conf.config import Config, JumpResource
from fastknock.errors import ConfigError, FirewallError, WireError
from fastknock.firewall.nft import (
    Change,
    Firewall,
    JumpLease,
    LeaseKey,
    LibNftables,
    PortLease,
    make_runner,
)
from fastknock.ipc import FwOp, FwRequest, FwStatus
from fastknock.osutil import metrics, privs, seccomp, systemd

log = logging.getLogger("fastknockfwd")

_BAD_ADDRS = {
    ipaddress.ip_address("0.0.0.0"),
    ipaddress.ip_address("255.255.255.255"),
    ipaddress.ip_address("::"),
    ipaddress.ip_address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
}
SWEEP_INTERVAL = 0.25


@dataclass
class _Item:
    changes: list[Change]
    install: bool
    future: asyncio.Future[FwStatus] | None  # None: internal (jump expiry)


@dataclass
class Peer:
    uid: int
    gid: int
    allow_root: bool = False

    def permits(self, uid: int, gid: int) -> bool:
        return (uid, gid) == (self.uid, self.gid) or (self.allow_root and uid == 0)


@dataclass
class Daemon:
    cfg: Config
    fw: Firewall
    peer: Peer
    clock: Callable[[], float] = time.time
    leases: dict[LeaseKey, float] = field(default_factory=dict)  # key -> deadline
    counts: Counter[str] = field(default_factory=Counter)
    _queue: list[_Item] = field(default_factory=list)
    _worker: asyncio.Task[None] | None = None
    _expiring: set[LeaseKey] = field(default_factory=set)  # jump expiries in flight

    def _now(self) -> float:
        return self.clock()

    # -- state from the kernel --

    def load(self) -> None:
        """(Re)read the live leases from the kernel."""
        now = self._now()
        self.leases = {
            lease.key: now + lease.remaining if lease.remaining is not None else float("inf")
            for lease in self.fw.scan()
        }

    def live(self) -> int:
        now = self._now()
        for key in [k for k, d in self.leases.items() if d <= now and isinstance(k, PortLease)]:
            del self.leases[key]  # the kernel expired it
        return len(self.leases)

    @property
    def stats(self) -> dict[str, int]:
        s = self.fw.stats
        return {
            "requests": self.counts["requests"],
            "acks": self.counts["acks"],
            "nacks": self.counts["nacks"],
            "transactions": s.transactions,
            "changes": s.changes,
            "fallbacks": s.fallbacks,
            "live": len(self.leases),
            "batches": self.counts["batches"],
            "failed_transactions": s.failed_transactions,
            "refused_peers": self.counts["refused_peers"],
        }

    def metric_families(self) -> list[metrics.Family]:
        replies = {k: v for k, v in self.counts.items() if k.startswith("status_")}
        return metrics.fwd_families({**self.stats, **replies})

    def log_stats(self) -> None:
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in self.stats.items()))

    # -- requests --

    def check(self, req: FwRequest) -> FwStatus | list[Change]:
        """The changes ``req`` asks for, or why it is refused."""
        cfg, nft = self.cfg, self.cfg.nftables
        assert nft is not None
        if not hmac.compare_digest(req.checksum, cfg.checksum):
            return FwStatus.BAD_CHECKSUM
        addr = req.addr  # ipc.decode_request normalised it
        if addr in _BAD_ADDRS or not self.fw.supports(addr):
            return FwStatus.BAD_ADDRESS
        res = cfg.resources.get(req.resource)
        if res is None:
            return FwStatus.UNKNOWN_RESOURCE
        if req.user not in cfg.keys or not cfg.allowed(req.user, res):
            return FwStatus.USER_NOT_ALLOWED
        install = req.op == FwOp.INSTALL
        timeout = res.timeout if res.timeout is not None else nft.timeout
        if isinstance(res, JumpResource):
            changes = []
            for hook, target, match in (
                ("input", res.input, res.input_match_saddr),
                ("forward", res.forward, res.forward_match_saddr),
                ("output", res.output, res.output_match_saddr),
            ):
                if target is None:
                    continue
                if self.fw.chains[hook] is None:
                    log.error("resource %08X needs [NFTABLES] chain-%s", res.id, hook)
                    return FwStatus.FIREWALL_ERROR
                lease = JumpLease(res.id, hook, target, addr if match else None)
                changes.append(Change(lease, install, timeout))
            return changes
        if res.port == 0 or res.port == cfg.port:
            return FwStatus.BAD_PORT
        protos = [p for p, on in (("tcp", res.tcp), ("udp", res.udp)) if on]
        return [Change(PortLease(addr, p, res.port), install, timeout) for p in protos]

    async def submit(self, req: FwRequest) -> FwStatus:
        self.counts["requests"] += 1
        checked = self.check(req)
        if isinstance(checked, FwStatus):
            status = checked
        else:
            future: asyncio.Future[FwStatus] = asyncio.get_running_loop().create_future()
            self._enqueue(_Item(checked, req.op == FwOp.INSTALL, future))
            status = await future
        self.counts["acks" if status == FwStatus.ACK else "nacks"] += 1
        self.counts[f"status_{status.name.lower()}"] += 1
        what = "install" if req.op == FwOp.INSTALL else "revoke"
        log.log(
            logging.INFO if status == FwStatus.ACK else logging.WARNING,
            "%s user=%08X resource=%08X addr=%s: %s",
            what, req.user, req.resource, req.addr, status.name,
        )  # fmt: skip
        return status

    def _enqueue(self, item: _Item) -> None:
        self._queue.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._run_batch(batch)
            except Exception:  # never leave a requester hanging
                log.exception("batch failed")
                for item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_result(FwStatus.FIREWALL_ERROR)

    async def _run_batch(self, batch: list[_Item]) -> None:
        assert self.cfg.nftables is not None
        self.counts["batches"] += 1
        cap = self.cfg.nftables.max_nr_rules
        planned: dict[LeaseKey, Change] = {}
        accepted: list[_Item] = []
        live = self.live()
        resynced = False
        for item in batch:
            if item.install:
                new = {c.key for c in item.changes if c.key not in self.leases}
                new -= planned.keys()
                if live + len(new) > cap and not resynced:
                    resynced = True
                    await asyncio.to_thread(self.load)
                    live = self.live() + sum(1 for k in planned if k not in self.leases)
                    new = {c.key for c in item.changes if c.key not in self.leases}
                    new -= planned.keys()
                if live + len(new) > cap:
                    if item.future is not None:
                        item.future.set_result(FwStatus.LIMIT)
                    continue
                live += len(new)
            for change in item.changes:
                planned.pop(change.key, None)
                planned[change.key] = change  # the last change to a key wins
            accepted.append(item)
        changes = list(planned.values())
        errors = await asyncio.to_thread(self.fw.apply, changes) if changes else []
        now = self._now()
        failed = set()
        for change, error in zip(changes, errors, strict=True):
            if error is not None:
                failed.add(change.key)
                log.error("nftables refused %s: %s", change, error)
            elif change.install:
                self.leases[change.key] = now + change.timeout
            else:
                self.leases.pop(change.key, None)
        self._expiring.difference_update(planned)
        log.debug(
            "transaction batch: %d requests, %d changes, %d failed; totals %s",
            len(batch), len(changes), len(failed), self.stats,
        )  # fmt: skip
        for item in accepted:
            if item.future is not None:
                bad = any(c.key in failed for c in item.changes)
                item.future.set_result(FwStatus.FIREWALL_ERROR if bad else FwStatus.ACK)

    async def sweep(self) -> None:
        """Remove jump leases whose deadline passed (port leases expire in the kernel)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self._now()
            due = [
                k
                for k, d in self.leases.items()
                if isinstance(k, JumpLease) and d <= now and k not in self._expiring
            ]
            if due:
                self._expiring.update(due)
                log.info("expiring %d jump lease(s)", len(due))
                self._enqueue(_Item([Change(k, False) for k in due], False, None))

    async def drain(self) -> None:
        if self._worker is not None:
            await self._worker

    # -- connections --

    async def serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            if not self.peer.permits(uid, gid):
                log.warning("refused peer pid=%d uid=%d gid=%d: not permitted", pid, uid, gid)
                self.counts["refused_peers"] += 1
                try:  # read the request first, so the peer sees the reply, not EPIPE
                    await asyncio.wait_for(reader.readexactly(ipc.REQUEST_SIZE), 1.0)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
                    pass
                await self._reply(writer, FwStatus.NOT_PERMITTED)
                return
            try:
                data = await asyncio.wait_for(
                    reader.readexactly(ipc.REQUEST_SIZE), self.cfg.control_timeout
                )
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as exc:
                log.warning(
                    "dropped peer pid=%d: no complete request (%s)", pid, type(exc).__name__
                )
                return
            try:
                req = ipc.decode_request(data)
            except WireError as exc:
                log.warning("malformed request from pid=%d: %s", pid, exc)
                await self._reply(writer, FwStatus.MALFORMED)
                return
            await self._reply(writer, await self.submit(req))
        except Exception:
            log.exception("connection handler failed")
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: FwStatus) -> None:
        try:
            writer.write(ipc.encode_reply(status))
            await asyncio.wait_for(writer.drain(), self.cfg.control_timeout)
        except (OSError, asyncio.TimeoutError):
            pass


# --- process ----------------------------------------------------------------------------------


def _server_account(name: str, test_mode: bool) -> Peer:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not test_mode:
            raise ConfigError(f"server user {name!r} does not exist", "--server-user") from None
        log.warning("server user %r does not exist; test mode: only root may connect", name)
        return Peer(0, 0, allow_root=True)
    return Peer(pw.pw_uid, pw.pw_gid, allow_root=test_mode)


def _raise_nofile() -> None:
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if soft < hard:
        rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (hard, hard))


def _running_instance(pidfile: str) -> int | None:
    """The PID in ``pidfile`` if that process is alive and is a fastknockfwd."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    if pid != os.getpid() and (b"fastknock.fwd" in cmdline or b"fastknockfwd" in cmdline):
        return pid
    return None


def list_leases(fw: Firewall, out: object = sys.stdout) -> int:
    rows = []
    for lease in sorted(fw.scan(), key=lambda x: str(x.key)):
        key = lease.key
        left = "permanent" if lease.remaining is None else f"{lease.remaining:.0f}s"
        if isinstance(key, PortLease):
            rows.append(f"{key.addr!s:<40} {key.proto}/{key.port:<12} {left}")
        else:
            addr = "any" if key.addr is None else str(key.addr)
            what = f"jump {key.hook}->{key.target} (res {key.resource:08X})"
            rows.append(f"{addr:<40} {what:<16} {left}")
    print(f"{len(rows)} lease(s)", file=out)  # type: ignore[call-overload]
    for row in rows:
        print(row, file=out)  # type: ignore[call-overload]
    return 0


async def _serve(args: argparse.Namespace, cfg: Config, fw: Firewall, peer: Peer) -> int:
    daemon = Daemon(cfg, fw, peer)
    await asyncio.to_thread(daemon.load)
    log.info("%d live lease(s) in the kernel (max-nr-rules %d)", daemon.live(),
             cfg.nftables.max_nr_rules if cfg.nftables else 0)  # fmt: skip
    rundir = os.path.join(args.rundir, ipc.SOCKET_DIR)
    os.makedirs(rundir, mode=0o750, exist_ok=True)
    os.chown(rundir, 0, peer.gid)
    os.chmod(rundir, 0o750)  # noqa: S103 -- group: the server account, like letmein
    path = ipc.socket_path(args.rundir)
    pidfile = ipc.pid_path(args.rundir)
    activated = [] if args.no_systemd else systemd.listen_fds()
    if activated:  # fastknockfwd.socket: systemd owns the path and its mode
        server = await asyncio.start_unix_server(daemon.serve_conn, sock=activated[0])
        path = ""
    else:
        if os.path.exists(path):
            os.unlink(path)  # stale socket of a killed instance
        server = await asyncio.start_unix_server(daemon.serve_conn, path, backlog=4096)
        os.chown(path, 0, peer.gid)
        os.chmod(path, 0o660)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, daemon.log_stats)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(_reload(args, daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sweeper = loop.create_task(daemon.sweep())
    writer = None
    if args.metrics_file:
        writer = metrics.MetricsWriter(
            args.metrics_file, daemon.metric_families, args.metrics_interval
        )
        writer.start()
    # Initialised: from here on only CAP_NET_ADMIN (uid 0 stays, to read the root-owned
    # config on reload), and the seccomp allow-list.
    if privs.keep_only_net_admin():
        log.info("capabilities reduced to CAP_NET_ADMIN")
    seccomp.install(args.seccomp_mode, "fwd")
    if not args.no_systemd:
        systemd.notify("READY=1")
    log.info("listening on %s (runner %s, pid %d)", path or "systemd socket", fw.runner.name,
             os.getpid())  # fmt: skip
    with open(pidfile, "w") as f:  # last: the PID file also says "initialised and serving"
        f.write(f"{os.getpid()}\n")
    try:
        await stop.wait()
    finally:
        log.info("shutting down; leases stay in the kernel")
        if not args.no_systemd:
            systemd.notify("STOPPING=1")
        server.close()
        sweeper.cancel()
        await daemon.drain()
        if writer is not None:
            await writer.stop()
        for p in (path, pidfile):
            if not p:
                continue
            try:
                os.unlink(p)
            except OSError:
                pass
        daemon.log_stats()
    return 0


async def _reload(args: argparse.Namespace, daemon: Daemon) -> None:
    """SIGHUP: validate the new config and set up its firewall, then swap; else keep the old."""
    if not args.no_systemd:
        systemd.notify("RELOADING=1")
    try:
        cfg = configmod.load_config(args.config, "server")
        if cfg.nftables is None:
            raise ConfigError("missing [NFTABLES] section", cfg.source)
        fw = Firewall(cfg.nftables, daemon.fw.runner, cfg.port, cfg.port_tcp, cfg.port_udp)
        await asyncio.to_thread(fw.setup)
    except (ConfigError, FirewallError) as exc:
        log.error("reload failed, keeping the old configuration: %s", exc)
    else:
        for warning in permissions.permission_warnings(args.config, cfg, "server"):
            log.warning("%s", warning)
        fw.stats = daemon.fw.stats
        daemon.cfg, daemon.fw = cfg, fw
        log.info("reloaded %s (checksum %s...)", cfg.source, cfg.checksum.hex()[:12])
    finally:
        if not args.no_systemd:
            systemd.notify("READY=1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastknockfwd", description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=configmod.DEFAULT_SERVER_CONFIG)
    ap.add_argument("--rundir", default="/run")
    ap.add_argument("--no-systemd", action="store_true", help="do not notify systemd")
    ap.add_argument("--test-mode", action="store_true", help="also accept root peers")
    ap.add_argument("--seccomp", choices=["off", "log", "kill"])
    ap.add_argument("--server-user", default="fastknock", help="account of fastknockd")
    ap.add_argument("--nft-exe", action="store_true", help="use [NFTABLES] exe, not libnftables")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the live leases and exit")
    ap.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write counters in Prometheus text format to PATH (node_exporter textfile)",
    )
    ap.add_argument("--metrics-interval", type=float, default=15.0, metavar="SECONDS")
    args = ap.parse_args(argv)
    if args.metrics_interval <= 0:
        ap.error("--metrics-interval must be positive")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="fastknockfwd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        log.error("must run as root (nftables, and --list shows every client address)")
        return 1
    try:
        cfg = configmod.load_config(args.config, "server")
        if cfg.nftables is None:
            raise ConfigError("missing [NFTABLES] section", cfg.source)
        peer = None if args.list else _server_account(args.server_user, args.test_mode)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    for warning in permissions.permission_warnings(args.config, cfg, "server"):
        log.warning("%s", warning)
    args.seccomp_mode = args.seccomp or cfg.seccomp.value
    try:
        runner = make_runner(cfg.nftables.exe, prefer_lib=not args.nft_exe)
        if args.seccomp_mode == "kill" and not isinstance(runner, LibNftables):
            log.error("seccomp = kill needs libnftables: the nft executable cannot run under it")
            return 2
        fw = Firewall(cfg.nftables, runner, cfg.port, cfg.port_tcp, cfg.port_udp)
        if args.list:
            return list_leases(fw)
        other = _running_instance(ipc.pid_path(args.rundir))
        if other is not None:
            log.error(
                "fastknockfwd is already running with pid %d (--rundir %s)", other, args.rundir
            )
            return 1
        fw.setup()
    except FirewallError as exc:
        log.error("%s", exc)
        return 1
    assert peer is not None
    _raise_nofile()
    return asyncio.run(_serve(args, cfg, fw, peer))


if __name__ == "__main__":
    sys.exit(main())
