"""``fastknockd``: the network-facing knock server (process, sockets, signals, firewall link).

The protocol lives in ``protocol.py`` (sans-I/O) and the transports in
``knockd/control.py``; this module only wires them to the world: it parses the command line
and the config, binds the control port(s) dual-stack (one IPv6 socket that also accepts
IPv4-mapped peers, or IPv4 only where the kernel has no IPv6), runs on uvloop when
importable (asyncio otherwise), forwards firewall requests to fastknockfwd over its Unix
socket with the config checksum (``knockd/fwdlink.py``), writes a PID file and stops
cleanly on SIGTERM/SIGINT, even with sessions in flight.

The UDP control port is read by the batched receive path (``knockd/recv.py``: recvmmsg, the
fused check in C) unless ``--udp-path protocol`` asks for the plain asyncio ``DatagramProtocol``.
``--workers N`` runs N such processes on one SO_REUSEPORT group (``knockd/workers.py``);
``--metrics-file`` writes the counters in Prometheus text format (``osutil/metrics.py``).

Hardening, in start-up order: read and check the config (permission warnings like
letmein's), take the control sockets from systemd (socket activation) or bind them, write
the PID file, drop root for good to ``--user`` (default ``fastknock``: no groups, no
capabilities, no_new_privs), start serving, install the seccomp allow-list
(``osutil/seccomp.py``), tell systemd READY. SIGHUP re-reads the config: a valid one replaces the
core (new sessions use it; sessions in flight finish on the old), a bad one is logged and
the old one keeps serving. The control port itself cannot change without a restart (the
sockets were bound as root).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from fastknock import __version__, ipc
from fastknock.conf import describe, permissions
from fastknock.conf.config import DEFAULT_SERVER_CONFIG, Config, load_config
from fastknock.errors import ConfigError, FastknockError
from fastknock.knockd import counters as knockd_counters
from fastknock.knockd import fwdlink, recv, sockets, workers
from fastknock.knockd.control import Controller, TcpProtocol, UdpProtocol
from fastknock.knockd.endpoint import Endpoint
from fastknock.knockd.limits import Budgets
from fastknock.osutil import metrics, privs, runfiles, seccomp, systemd
from fastknock.protocol import ServerSettings

# Imported at start-up, not when the loop starts: by then root is dropped and the Python
# installation may be unreadable (e.g. below a 0700 /root).
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("fastknockd")

DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_PER_SOURCE = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastknockd",
        description="The fastknock server: answers knocks on the control port and asks "
        "fastknockfwd to open the knocked port for the knocking address. Speaks letmein's "
        "protocol and reads letmein's config format.",
    )
    p.add_argument(
        "-c",
        "--config",
        default=DEFAULT_SERVER_CONFIG,
        metavar="CONF",
        help=f"server configuration file (default: {DEFAULT_SERVER_CONFIG})",
    )
    p.add_argument(
        "--rundir",
        default="/run",
        metavar="DIR",
        help="runtime directory: fastknockd/ (PID file) and fastknockfwd/ (the firewall "
        "daemon's socket) live below it (default: /run)",
    )
    p.add_argument(
        "-n",
        "--num-connections",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help="maximum concurrent authenticated sessions, for UDP and for TCP each "
        f"(default: {DEFAULT_MAX_SESSIONS})",
    )
    p.add_argument(
        "-N",
        "--num-ip-connections",
        type=int,
        default=DEFAULT_MAX_PER_SOURCE,
        metavar="N",
        help="maximum concurrent sessions per source: IPv4 address or IPv6 /56 "
        f"(default: {DEFAULT_MAX_PER_SOURCE}); per IPv6 /48: 4 times as many",
    )
    p.add_argument(
        "--tcp-preauth-max",
        type=int,
        default=128,
        metavar="N",
        help="TCP connections that have not proved the key yet, in all; when full, the "
        "oldest is closed for a new one (default: 128)",
    )
    p.add_argument(
        "--tcp-preauth-per-source",
        type=int,
        default=4,
        metavar="N",
        help="such connections per source (IPv4 address or IPv6 /56; per /48: 4 times as "
        "many); past it a new one is refused (default: 4)",
    )
    p.add_argument(
        "--tcp-preauth-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a TCP connection must send its first message within this time "
        "(default: 1.0; at most the control timeout)",
    )
    p.add_argument(
        "--no-systemd",
        action="store_true",
        help="ignore systemd: no socket activation, no sd_notify",
    )
    p.add_argument(
        "--seccomp",
        choices=["off", "log", "kill"],
        default=None,
        help="override [GENERAL] seccomp: the system-call allow-list (log: log violations, "
        "kill: kill the process on one)",
    )
    p.add_argument(
        "--udp-path",
        choices=recv.PATHS,
        default="batched",
        help="UDP receive path: batched (recvmmsg, checks in C; default) or protocol "
        "(asyncio DatagramProtocol, one callback per datagram)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="receive processes on one SO_REUSEPORT socket group (default: 1); -n and -N "
        "apply per worker",
    )
    p.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write counters in Prometheus text format to PATH (node_exporter textfile "
        "collector); with --workers N, worker i writes PATH.worker<i>.prom",
    )
    p.add_argument(
        "--metrics-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between metrics writes (default: 15)",
    )
    p.add_argument(
        "--user",
        default=privs.DEFAULT_USER,
        help="started as root, drop to this account once the sockets are bound "
        f"(default: {privs.DEFAULT_USER}; fastknock-install creates it)",
    )
    p.add_argument("--group", help="drop to this group (default: the account's own)")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config, print a summary (never keys) and exit (non-zero on error)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (every reject)")
    p.add_argument("--version", action="version", version=f"fastknockd {__version__}")
    return p


async def serve(
    config: Config,
    args: argparse.Namespace,
    socks: sockets.Sockets,
    worker: int = 0,
    settings: ServerSettings | None = None,
) -> None:
    """Serve on the bound (or systemd-passed) ``socks`` until SIGTERM/SIGINT. ``settings``:
    built from ``config`` unless given; either way ``config``'s keys are dropped here (the
    key ring holds what the checks need)."""
    loop = asyncio.get_running_loop()
    budgets = Budgets.default(
        args.num_connections,
        args.num_ip_connections,
        args.tcp_preauth_max,
        args.tcp_preauth_per_source,
        args.tcp_preauth_timeout,
    )
    if settings is None:
        settings = ServerSettings.from_config(config)
    config = config.without_keys()
    endpoint = Endpoint(settings, budgets, os.urandom, time.monotonic())
    del settings
    link = fwdlink.FwdLink(ipc.socket_path(args.rundir), config.checksum)
    controller = Controller(endpoint, link)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    udp: recv.BatchedUdp | UdpProtocol | None = None
    tcp: asyncio.base_events.Server | None = None
    udp_sock, tcp_sock = socks
    reloads = _Reloads(args, controller, link, config)
    loop.add_signal_handler(signal.SIGHUP, reloads.start)
    if _StartupHup.take():  # one arrived while we started: the file may have changed since
        reloads.start()
    if udp_sock is not None:
        udp = await recv.open_udp(controller, udp_sock, args.udp_path)
    if tcp_sock is not None:
        tcp = await loop.create_server(lambda: TcpProtocol(controller), sock=tcp_sock, backlog=128)
    writer = None
    if args.metrics_file:
        info = {"version": __version__, "udp_path": args.udp_path, "reader": recv.IMPLEMENTATION}
        writer = metrics.MetricsWriter(
            metrics.worker_path(args.metrics_file, worker, args.workers),
            lambda: knockd_counters.families(controller.counters, budgets.active, info),
            args.metrics_interval,
            (("worker", str(worker)),) if args.workers > 1 else (),
        )
        writer.start()
    protos = ",".join(p for p, on in (("udp", config.port_udp), ("tcp", config.port_tcp)) if on)
    log.info(
        "fastknockd %s listening on port %d/%s (%d users, %d resources, policy %s)",
        __version__,
        config.port,
        protos,
        len(config.keys),
        len(config.resources),
        config.control_error_policy.value,
    )
    seccomp.install(args.seccomp_mode, "server")
    if not args.no_systemd:
        systemd.notify("READY=1")
    try:
        await stop.wait()
    finally:
        systemd.stopping(log, not args.no_systemd, "fastknockd stopping")
        if tcp is not None:
            tcp.close()
        if udp is not None:
            udp.close()
        await controller.close()
        if tcp is not None:
            await tcp.wait_closed()
        if writer is not None:
            await writer.stop()


class _Reloads:
    """SIGHUP: read and parse the new config in a thread (a slow file never stalls serving),
    then swap the core on the loop; a bad one changes nothing. One reload at a time."""

    def __init__(
        self, args: argparse.Namespace, controller: Controller, link: fwdlink.FwdLink, old: Config
    ) -> None:
        self.args, self.controller, self.link, self.old = args, controller, link, old
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        task = asyncio.get_running_loop().create_task(self.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        async with self.lock:
            with systemd.reloading(log, not self.args.no_systemd):
                new = await asyncio.to_thread(load_config, self.args.config, "server")
                old = self.old
                if (new.port, new.port_udp, new.port_tcp) != (old.port, old.port_udp, old.port_tcp):
                    log.warning(
                        "the control port changed: that takes a restart; the rest applies now"
                    )
                self.controller.reload(ServerSettings.from_config(new))
                self.link.checksum = new.checksum
                log.info("reloaded %s (%d users, %d resources)", new.source, len(new.keys),
                         len(new.resources))  # fmt: skip


def _write_pid(rundir: str, account: tuple[int, int] | None) -> str:
    """``RUNDIR/fastknockd/fastknockd.pid``; the directory (and file) belong to ``account``
    so it can remove the file at exit, hence root never follows a link in there
    (``osutil.runfiles``: opened O_NOFOLLOW, created O_EXCL, chowned by fd)."""
    uid, gid = account if account is not None else (-1, -1)
    directory = runfiles.RunDir(os.path.join(rundir, "fastknockd"), 0o755, uid, gid)
    try:
        return directory.write_new("fastknockd.pid", f"{os.getpid()}\n", 0o644, uid, gid)
    finally:
        directory.close()


def _run(coro: object) -> None:
    if uvloop is None:
        log.debug("uvloop not available, using asyncio")
        asyncio.run(coro)
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def _run_workers(
    config: Config,
    args: argparse.Namespace,
    groups: list[sockets.Sockets],
    settings: ServerSettings,
) -> int:

    def child(index: int) -> int:
        for i, group in enumerate(groups):
            if i != index:
                for sock in group:
                    if sock is not None:
                        sock.close()
        _run(serve(config, args, groups[index], index, settings))
        return 0

    try:
        return workers.supervise(args.workers, child, _StartupHup.take)
    finally:
        for group in groups:
            for sock in group:
                if sock is not None:
                    sock.close()


class _StartupHup:
    """SIGHUP before the event loop serves (loading, binding, forking workers): remembered,
    and a reload runs once serving; never the default action, which kills the process."""

    pending = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGHUP, cls._handler)

    @classmethod
    def _handler(cls, _signum: int, _frame: object) -> None:
        cls.pending = True

    @classmethod
    def take(cls) -> bool:
        pending, cls.pending = cls.pending, False
        return pending


def main(argv: Sequence[str] | None = None) -> int:
    _StartupHup.install()  # first: a SIGHUP during start-up must not kill us
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="fastknockd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config, role="server")
    except ConfigError as exc:
        print(f"fastknockd: {exc}", file=sys.stderr)
        return 2
    for warning in permissions.permission_warnings(args.config, config, "server"):
        log.warning("%s", warning)
    if args.check_config:
        print(describe.summary(config))
        return 0
    if config.debug and not args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    if min(args.num_connections, args.num_ip_connections, args.tcp_preauth_max,
           args.tcp_preauth_per_source) < 1:  # fmt: skip
        print("fastknockd: -n, -N and the --tcp-preauth caps must be at least 1", file=sys.stderr)
        return 2
    if not 0 < args.tcp_preauth_timeout < 3600:
        print("fastknockd: --tcp-preauth-timeout must be a positive number of seconds",
              file=sys.stderr)  # fmt: skip
        return 2
    args.seccomp_mode = args.seccomp or config.seccomp.value
    if args.seccomp_mode != "off":
        seccomp.forbid_io_uring()  # before any event loop exists (see osutil/seccomp.py)
    if args.workers < 1 or args.metrics_interval <= 0:
        print("fastknockd: --workers and --metrics-interval must be positive", file=sys.stderr)
        return 2
    try:
        account = privs.lookup(args.user, args.group) if os.geteuid() == 0 else None
        activated = None if args.no_systemd else sockets.activated(config)
        if activated is not None and args.workers > 1:
            raise FastknockError("--workers needs sockets of its own: not with socket activation")
        if activated is not None:
            groups = [activated]
        else:
            reuse = args.workers > 1
            groups = [sockets.bind_control(config, reuseport=reuse) for _ in range(args.workers)]
        pid_file = _write_pid(args.rundir, account)
        if account is not None:
            privs.drop_to(args.user, args.group)
            log.info("dropped privileges to %s (uid %d, gid %d)", args.user, *account)
    except (FastknockError, OSError) as exc:
        print(f"fastknockd: {exc}", file=sys.stderr)
        return 1
    settings = ServerSettings.from_config(config)  # the key ring: from here on, no raw keys
    config = config.without_keys()
    try:
        if args.workers == 1:
            _run(serve(config, args, groups[0], 0, settings))
        else:
            return _run_workers(config, args, groups, settings)
    except OSError as exc:
        print(f"fastknockd: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            os.unlink(pid_file)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
