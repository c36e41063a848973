"""fastknockfwd: the privileged firewall daemon (the only part of fastknock that runs as root).

Design
------
fastknockd (unprivileged, network-facing) asks over a Unix socket for "install lease" or
"revoke lease" (``ipc``); this daemon checks the request against its own copy of the
config (``firewall.daemon``) and turns it into nftables changes (``firewall.nft``). This
main imports only ``fastknock.ipc``, ``fastknock.conf``, ``fastknock.firewall``,
``fastknock.osutil`` and ``fastknock.errors``: little code runs as root, and
``tests/test_layering.py`` fails if its import closure ever holds the network-facing code.

- Socket ``RUNDIR/fastknockfwd/fastknockfwd.sock``, 0660 <own account>:<server group>, in
  a 0750 directory of the same owner; PID file next to it, locked with ``flock`` for the
  process's life (a second instance is refused; the PID is written last: "initialised and
  serving"). Root creates these without following links (``osutil.runfiles``). Or the
  socket systemd passed (``fastknockfwd.socket``). Who may connect, the request checks,
  batching, the cap and expiry: ``firewall.daemon``.
- Keys: never needed; dropped from the config as it is loaded (``Config.without_keys``).
- After set-up: our own account (``--user``, default ``fastknockfwd``) with CAP_NET_ADMIN
  alone (``osutil.privs.become_with_net_admin``): no root file is ours, so a compromised
  daemon cannot read /etc/shadow or rewrite a root file. The server account's group is a
  supplementary group, to re-read the 0640 config on reload. Then the seccomp allow-list
  (``osutil.seccomp``), then READY=1. ``--metrics-file`` is written as that account.
- SIGHUP: the new config and its firewall set-up are validated, then swapped in; a bad
  one changes nothing (``osutil.systemd.reloading``).
- SIGTERM/SIGINT: stop accepting, finish the batch in flight, remove socket and PID file,
  exit 0. Leases stay in the kernel (see ``firewall.nft``'s header for how an admin
  flushes them). ``--list`` prints the live leases and exits.
- ``[HOOKS]``: the hook runner (``firewall.hookproc``/``hookrun``) is started in ``main``
  after the firewall set-up and before ``asyncio.run``: no thread exists yet, we are still
  root (it becomes ``hook-user`` itself) and the seccomp filter, which forbids new
  processes, comes later. ``--statedir`` (root creates it, ours, 0700) holds the record of
  open knock-leases, read after the drop, before serving (``firewall.hooks``).
- Counters (``Daemon.stats``) are logged per transaction with ``-v``, on SIGUSR1 and at
  exit (``stats: requests=... transactions=...``), and with ``--metrics-file`` written in
  Prometheus text format every ``--metrics-interval`` seconds (``osutil.metrics``: stdlib
  only).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures.thread  # noqa: F401 -- see below
import contextlib
import logging
import os
import pwd
import resource as rlimit
import signal
import sys
from dataclasses import dataclass

from fastknock import __version__, ipc
from fastknock.conf import config as configmod
from fastknock.conf import permissions
from fastknock.conf.config import Config
from fastknock.errors import ConfigError, FastknockError, FirewallError
from fastknock.firewall import hookproc
from fastknock.firewall.daemon import Daemon, ServerAccount
from fastknock.firewall.hooks import HookLeases, list_record
from fastknock.firewall.leases import PortLease, needs_ranges
from fastknock.firewall.nft import Firewall
from fastknock.firewall.runner import LibNftables, Runner, make_runner
from fastknock.osutil import metrics, privs, runfiles, seccomp, systemd

# concurrent.futures.thread is imported now, not lazily by asyncio.to_thread: after the drop
# to our own account the Python installation may be unreadable (e.g. below a 0700 /root).

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


@dataclass(frozen=True)
class OwnAccount:
    """The account fastknockfwd runs as once set up (CAP_NET_ADMIN kept); ``groups``: the
    server account's group, to re-read the 0640 root:<server group> config on reload."""

    uid: int
    gid: int
    groups: list[int]


def _own_account(name: str, server: ServerAccount, test_mode: bool) -> OwnAccount | None:
    """``--user``'s ids; None (uid 0 stays, CAP_NET_ADMIN only) in test mode without it."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not test_mode:
            raise ConfigError(
                f"account {name!r} does not exist; create it with 'useradd --system "
                f"--no-create-home --shell /usr/sbin/nologin {name}' (fastknock-install does "
                "this), or choose another with --user",
                "--user",
            ) from None
        log.warning("account %r does not exist; test mode: staying uid 0 (CAP_NET_ADMIN)", name)
        return None
    if pw.pw_uid == 0:
        raise ConfigError(f"account {name!r} is root: fastknockfwd needs one of its own", "--user")
    return OwnAccount(pw.pw_uid, pw.pw_gid, sorted({server.gid} - {0}))


def _load(path: str) -> Config:
    """The config with its keys dropped: fastknockfwd never needs a key."""
    cfg = configmod.load_config(path, "server").without_keys()
    if cfg.nftables is None:
        raise ConfigError("missing [NFTABLES] section", cfg.source)
    return cfg


def _firewall(cfg: Config, runner: Runner) -> Firewall:
    """The nftables layer for ``cfg`` (interval sets if its resources need them)."""
    assert cfg.nftables is not None
    wide = needs_ranges(cfg)
    if wide:
        log.info("resources with port ranges or prefixes (interval sets): %s",
                 " ".join(f"{rid:08X}" for rid in wide))  # fmt: skip
    return Firewall(cfg.nftables, runner, cfg.port, cfg.port_tcp, cfg.port_udp, ranges=bool(wide))


def list_leases(fw: Firewall, out: object = sys.stdout) -> int:
    rows = []
    for lease in sorted(fw.scan(), key=lambda x: str(x.key)):
        key = lease.key
        left = "permanent" if lease.remaining is None else f"{lease.remaining:.0f}s"
        if isinstance(key, PortLease):
            rows.append(f"{key.addr!s:<40} {key.proto}/{key.ports:<12} {left}")
        else:
            addr = "any" if key.addr is None else str(key.addr)
            what = f"jump {key.hook}->{key.target} (res {key.resource:08X})"
            rows.append(f"{addr:<40} {what:<16} {left}")
    print(f"{len(rows)} lease(s)", file=out)  # type: ignore[call-overload]
    for row in rows:
        print(row, file=out)  # type: ignore[call-overload]
    return 0


async def _serve(
    args: argparse.Namespace,
    cfg: Config,
    fw: Firewall,
    account: ServerAccount,
    own: OwnAccount | None,
    rundir: runfiles.RunDir,
    lock: runfiles.PidLock,
    hooks: HookLeases | None = None,
) -> int:
    daemon = Daemon(cfg, fw, account, hooks=hooks)
    del cfg  # the daemon's copy is the one that reloads replace
    path = ipc.socket_path(args.rundir)
    activated = [] if args.no_systemd else systemd.listen_fds()
    if activated:  # fastknockfwd.socket: systemd owns the path and its mode
        server = await asyncio.start_unix_server(
            daemon.serve_conn, sock=activated[0], start_serving=False
        )
        path = ""
    else:
        rundir.remove(ipc.SOCKET_NAME)  # stale socket of a killed instance (a link: removed)
        old_umask = os.umask(0o117)  # born 0660: no chmod of a path that could be swapped
        try:
            server = await asyncio.start_unix_server(
                daemon.serve_conn, path, backlog=4096, start_serving=False
            )
        finally:
            os.umask(old_umask)
        os.chown(path, own.uid if own else 0, account.gid, follow_symlinks=False)
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
    # Initialised: from here on our own account with CAP_NET_ADMIN alone (no root file is
    # ours any more), and the seccomp allow-list.
    if own is not None and privs.become_with_net_admin(own.uid, own.gid, own.groups):
        log.info("running as uid %d gid %d with CAP_NET_ADMIN only", own.uid, own.gid)
    elif privs.keep_only_net_admin():
        log.info("capabilities reduced to CAP_NET_ADMIN (uid 0: test mode)")
    # Threads only from here on: capabilities are per thread (see osutil.privs).
    await asyncio.to_thread(daemon.load)
    daemon.prune_expired()
    hook_task = None
    if hooks is not None:  # before serving: a re-knock of a recorded lease is a refresh
        await asyncio.to_thread(hooks.restore)
        hook_task = loop.create_task(hooks.run())
    log.info("%d live lease(s) in the kernel (max-nr-rules %d)", daemon.live_count(),
             daemon.cfg.nftables.max_nr_rules if daemon.cfg.nftables else 0)  # fmt: skip
    await server.start_serving()  # requests only once the live leases are known
    seccomp.install(args.seccomp_mode, "fwd")
    if not args.no_systemd:
        systemd.notify("READY=1")
    log.info("listening on %s (runner %s, pid %d)", path or "systemd socket",
             daemon.fw.runner.name, os.getpid())  # fmt: skip
    lock.publish(os.getpid())  # last: the PID file also says "initialised and serving"
    try:
        await stop.wait()
    finally:
        systemd.stopping(log, not args.no_systemd, "shutting down; leases stay in the kernel")
        server.close()
        sweeper.cancel()
        watcher.cancel()
        await daemon.drain()
        if hook_task is not None and hooks is not None:
            hook_task.cancel()
            await hooks.stop()
        if writer is not None:
            await writer.stop()
        if path:
            with contextlib.suppress(OSError):
                rundir.remove(ipc.SOCKET_NAME)
        lock.release()
        rundir.close()
        daemon.log_stats()
    return 0


async def _reload(args: argparse.Namespace, daemon: Daemon) -> None:
    """SIGHUP: validate the new config and set up its firewall, then swap; else keep the old."""
    with systemd.reloading(log, not args.no_systemd):
        # Read and parsed in a thread: a slow file never stalls the requests being served.
        cfg = await asyncio.to_thread(_load, args.config)
        assert cfg.nftables is not None
        fw = _firewall(cfg, daemon.fw.runner)
        await asyncio.to_thread(fw.setup)
        for warning in permissions.permission_warnings(args.config, cfg, "server"):
            log.warning("%s", warning)
        fw.stats = daemon.fw.stats
        if daemon.hooks is not None:
            daemon.hooks.reconfigure(cfg.hooks)
        elif hookproc.wanted(cfg.hooks):
            log.warning("[HOOKS] added: the hook runner starts at the next restart")
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
        "--user",
        default="fastknockfwd",
        metavar="USER",
        help="the account fastknockfwd becomes once set up, keeping CAP_NET_ADMIN alone, so "
        "it owns no root file (default: fastknockfwd; fastknock-install creates it; with "
        "--test-mode a missing account keeps uid 0)",
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
    ap.add_argument(
        "--statedir",
        default="/var/lib/fastknockfwd",
        metavar="DIR",
        help="with [HOOKS]: the record of open knock-leases (hook-leases.json), so that "
        "on-close also fires for leases that expired while fastknockfwd was stopped "
        "(default: /var/lib/fastknockfwd)",
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
        cfg = _load(args.config)
        account = None if args.list else _server_account(args.server_user, args.test_mode)
        own = None if account is None else _own_account(args.user, account, args.test_mode)
        hook_user = None
        if account is not None and cfg.hooks is not None and hookproc.wanted(cfg.hooks):
            hook_user = hookproc.hook_account(cfg.hooks.user, cfg.source)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    for warning in permissions.permission_warnings(args.config, cfg, "server"):
        log.warning("%s", warning)
    args.seccomp_mode = args.seccomp or cfg.seccomp.value
    assert cfg.nftables is not None
    try:
        runner = make_runner(cfg.nftables.exe, prefer_lib=not args.nft_exe)
        if args.seccomp_mode == "kill" and not isinstance(runner, LibNftables):
            log.error("seccomp = kill needs libnftables: the nft executable cannot run under it")
            return 2
        fw = _firewall(cfg, runner)
        if args.list:
            fw.detect_ranges()  # also the leases of an earlier config's ranges/prefixes
            code = list_leases(fw)
            if hookproc.wanted(cfg.hooks):
                print("\n".join(list_record(args.statedir)))
            return code
        assert account is not None
        # Run directory: ours (so we can clean up after the drop), group: the server account
        # (0750, like letmein). The lock on the PID file keeps a second instance out.
        rundir = runfiles.RunDir(
            os.path.join(args.rundir, ipc.SOCKET_DIR), 0o750, own.uid if own else 0, account.gid
        )
        try:
            lock = runfiles.PidLock(rundir, ipc.PID_NAME, own.uid if own else 0, 0)
        except runfiles.AlreadyRunning as exc:
            rundir.close()
            log.error("fastknockfwd is %s (--rundir %s)", exc, args.rundir)
            return 1
        hooks = None
        try:
            fw.setup()
            if hook_user is not None:  # before any thread and the seccomp filter
                hooks = _start_hooks(args, cfg, own, hook_user)
        except BaseException:
            lock.release()
            rundir.close()
            raise
    except (FirewallError, FastknockError, OSError) as exc:
        log.error("%s", exc)
        return 1
    _raise_nofile()
    return asyncio.run(_serve(args, cfg, fw, account, own, rundir, lock, hooks))


def _start_hooks(
    args: argparse.Namespace, cfg: Config, own: OwnAccount | None, user: hookproc.HookAccount
) -> HookLeases:
    """The state directory (ours, 0700: we write the record after the drop) and the hook
    runner (``firewall.hookproc``)."""
    assert cfg.hooks is not None
    statedir = runfiles.RunDir(args.statedir, 0o700, own.uid if own else 0,
                               own.gid if own else 0)  # fmt: skip
    try:
        feed = hookproc.start_runner(user, cfg.hooks)
    except BaseException:
        statedir.close()
        raise
    return HookLeases(feed, statedir)


if __name__ == "__main__":
    sys.exit(main())
