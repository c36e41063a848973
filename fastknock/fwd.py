"""fastknockfwd: the privileged firewall daemon (the only part of fastknock that runs as root).

Design
------
fastknockd (unprivileged, network-facing) asks over a Unix socket for "install lease" or
"revoke lease" (``ipc``); this daemon checks the request against its own copy of the
config (``firewall.daemon``) and turns it into nftables changes (``firewall.nft``). This
main imports only ``fastknock.ipc``, ``fastknock.conf``, ``fastknock.firewall``,
``fastknock.osutil`` and ``fastknock.errors``: little code runs as root, and
``tests/test_layering.py`` fails if its import closure ever holds the network-facing code.

- Socket ``RUNDIR/fastknockfwd/fastknockfwd.sock``, 0660 root:<server group>, in a 0750
  directory; PID file next to it (written last: "initialised and serving"). Or the socket
  systemd passed (``fastknockfwd.socket``). Who may connect, the request checks, batching,
  the cap and expiry: ``firewall.daemon``.
- After set-up: only CAP_NET_ADMIN (uid 0 stays, to read the root-owned config on
  reload), then the seccomp allow-list (``osutil.seccomp``), then READY=1.
- SIGHUP: the new config and its firewall set-up are validated, then swapped in; a bad
  one changes nothing (``osutil.systemd.reloading``).
- SIGTERM/SIGINT: stop accepting, finish the batch in flight, remove socket and PID file,
  exit 0. Leases stay in the kernel (see ``firewall.nft``'s header for how an admin
  flushes them). ``--list`` prints the live leases and exits.
- Counters (``Daemon.stats``) are logged per transaction with ``-v``, on SIGUSR1 and at
  exit (``stats: requests=... transactions=...``), and with ``--metrics-file`` written in
  Prometheus text format every ``--metrics-interval`` seconds (``osutil.metrics``: stdlib
  only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import resource as rlimit
import signal
import sys

from fastknock import __version__, ipc
from fastknock.conf import config as configmod
from fastknock.conf import permissions
from fastknock.conf.config import Config
from fastknock.errors import ConfigError, FirewallError
from fastknock.firewall.daemon import Daemon, ServerAccount
from fastknock.firewall.nft import Firewall, PortLease
from fastknock.firewall.runner import LibNftables, make_runner
from fastknock.osutil import metrics, privs, seccomp, systemd

log = logging.getLogger("fastknockfwd")

# --- process ----------------------------------------------------------------------------------


def _server_account(name: str, test_mode: bool) -> ServerAccount:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not test_mode:
            raise ConfigError(f"server user {name!r} does not exist", "--server-user") from None
        log.warning("server user %r does not exist; test mode: only root may connect", name)
        return ServerAccount(0, 0, allow_root=True)
    return ServerAccount(pw.pw_uid, pw.pw_gid, allow_root=test_mode)


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


async def _serve(
    args: argparse.Namespace, cfg: Config, fw: Firewall, account: ServerAccount
) -> int:
    daemon = Daemon(cfg, fw, account)
    await asyncio.to_thread(daemon.load)
    daemon.prune_expired()
    log.info("%d live lease(s) in the kernel (max-nr-rules %d)", daemon.live_count(),
             cfg.nftables.max_nr_rules if cfg.nftables else 0)  # fmt: skip
    rundir = os.path.join(args.rundir, ipc.SOCKET_DIR)
    os.makedirs(rundir, mode=0o750, exist_ok=True)
    os.chown(rundir, 0, account.gid)
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
        os.chown(path, 0, account.gid)
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
    if args.metrics_file:  # fresher pre-filter counters for frequent metrics
        daemon.prefilter_poll = min(daemon.prefilter_poll, args.metrics_interval)
    watcher = loop.create_task(daemon.watch_prefilter())
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
        systemd.stopping(log, not args.no_systemd, "shutting down; leases stay in the kernel")
        server.close()
        sweeper.cancel()
        watcher.cancel()
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
    with systemd.reloading(log, not args.no_systemd):
        # Read and parsed in a thread: a slow file never stalls the requests being served.
        cfg = await asyncio.to_thread(configmod.load_config, args.config, "server")
        if cfg.nftables is None:
            raise ConfigError("missing [NFTABLES] section", cfg.source)
        fw = Firewall(cfg.nftables, daemon.fw.runner, cfg.port, cfg.port_tcp, cfg.port_udp)
        await asyncio.to_thread(fw.setup)
        for warning in permissions.permission_warnings(args.config, cfg, "server"):
            log.warning("%s", warning)
        fw.stats = daemon.fw.stats
        daemon.cfg, daemon.fw = cfg, fw
        log.info("reloaded %s (checksum %s...)", cfg.source, cfg.checksum.hex()[:12])


def build_parser() -> argparse.ArgumentParser:
    conf = configmod.DEFAULT_SERVER_CONFIG
    ap = argparse.ArgumentParser(
        prog="fastknockfwd",
        description="The privileged firewall daemon of fastknock: keeps only CAP_NET_ADMIN, "
        "takes lease requests from fastknockd on a Unix socket, checks each against its own "
        "copy of the config and applies it to nftables.",
    )
    ap.add_argument(
        "-c",
        "--config",
        default=conf,
        metavar="CONF",
        help=f"server configuration file, the same as fastknockd's (default: {conf})",
    )
    ap.add_argument(
        "--rundir",
        default="/run",
        metavar="DIR",
        help="the socket and the PID file live in DIR/fastknockfwd/ (default: /run)",
    )
    ap.add_argument(
        "--server-user",
        default=privs.DEFAULT_USER,
        metavar="USER",
        help="the account fastknockd runs as: only its uid and gid may use the socket, which "
        f"belongs to its group (default: {privs.DEFAULT_USER})",
    )
    ap.add_argument(
        "--seccomp",
        choices=["off", "log", "kill"],
        help="override [GENERAL] seccomp: the system-call allow-list (log: log violations, "
        "kill: kill the process on one; needs libnftables)",
    )
    ap.add_argument(
        "--nft-exe", action="store_true", help="run [NFTABLES] exe instead of using libnftables"
    )
    ap.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write counters in Prometheus text format to PATH (node_exporter textfile)",
    )
    ap.add_argument(
        "--metrics-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between metrics writes (default: 15)",
    )
    ap.add_argument("--list", action="store_true", help="print the live leases and exit")
    ap.add_argument(
        "--no-systemd",
        action="store_true",
        help="ignore systemd: no socket activation, no sd_notify",
    )
    ap.add_argument(
        "--test-mode",
        action="store_true",
        help="tests and debugging only: also accept requests from root (uid 0), and start "
        "even if the server account does not exist; never in production (any root process "
        "could then open ports)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=f"fastknockfwd {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
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
        account = None if args.list else _server_account(args.server_user, args.test_mode)
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
    assert account is not None
    _raise_nofile()
    return asyncio.run(_serve(args, cfg, fw, account))


if __name__ == "__main__":
    sys.exit(main())
