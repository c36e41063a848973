"""``fastknock``: the client command line (letmein's interface).

    fastknock [-c CONF] [-v] knock  HOST [PORT] [-r RES] [-u USER] [-P PORT] [-T|-U] [-4] [-6]
    fastknock [-c CONF] [-v] revoke HOST [PORT] [-r RES] [-u USER] [-P PORT] [-T|-U] [-4] [-6]
    fastknock gen-key [-u USER]

Made to run from ``~/.ssh/config`` (``Match host X exec "fastknock knock X 22"``): silent on
success, one line per failure on stderr, and only the modules a command needs are imported
(``gen-key`` loads no crypto or socket code). Exit status: 0 after COMEIN, 1 when the knock
failed, 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastknock.errors import KnockError, KnockFailed, UsageError

if TYPE_CHECKING:
    from fastknock.conf.config import Config
    from fastknock.knock.client import Target

EXIT_FAILED = 1
EXIT_USAGE = 2


def _hex_id(text: str) -> int:
    digits = text[2:] if text.lower().startswith("0x") else text
    if not 1 <= len(digits) <= 8 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise argparse.ArgumentTypeError(f"{text!r} is not an id of 1 to 8 hex digits")
    return int(digits, 16)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from fastknock import __version__
    from fastknock.conf.config import DEFAULT_CLIENT_CONFIG

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        metavar="CONF",
        help=f"client configuration file (default: {DEFAULT_CLIENT_CONFIG})",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show each step"
    )
    parser = argparse.ArgumentParser(
        prog="fastknock",
        parents=[common],
        description="Knock a port open on a fastknock or letmein server, revoke it, or "
        "generate a key. The server opens the port for this machine's address only, "
        "for a limited time.",
        epilog="Example: fastknock knock server.example.org 22   (in ~/.ssh/config: "
        'Match host server.example.org exec "fastknock knock %h 22")',
    )
    parser.add_argument("--version", action="version", version=f"fastknock {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, verb, port_verb in (("knock", "open", "open"), ("revoke", "close again", "close")):
        p = sub.add_parser(
            name,
            parents=[common],
            help=f"{verb} a resource for this machine's address",
            description=f"Authenticate to the server at HOST and ask it to {verb} a port "
            "(or a jump resource) for this machine's address. Without -4/-6 both the IPv6 "
            "and the IPv4 address of HOST are used, and one success is enough; with both "
            "flags both must succeed.",
        )
        p.add_argument("host", metavar="HOST", help="server host name or address")
        p.add_argument(
            "port",
            metavar="PORT",
            type=_port,
            nargs="?",
            help=f"the port to {port_verb}, looked up in the config's [RESOURCES]",
        )
        p.add_argument(
            "-r", "--resource", type=_hex_id, metavar="RES", help="resource id (hex), not PORT"
        )
        p.add_argument(
            "-u",
            "--user",
            type=_hex_id,
            metavar="USER",
            help="user id (hex); default: [CLIENT] default-user",
        )
        p.add_argument(
            "-P",
            "--server-port",
            type=_port,
            metavar="PORT",
            help="control port of the server (default: the config's port, else 5800)",
        )
        proto = p.add_mutually_exclusive_group()
        proto.add_argument("-T", "--tcp", action="store_true", help="use TCP for the control port")
        proto.add_argument(
            "-U",
            "--udp",
            action="store_true",
            help="use UDP for the control port (if the config's port offers tcp too, a "
            "knock that gets no answer within half the control timeout is retried over TCP)",
        )
        p.add_argument("-4", "--ipv4", action="store_true", help="knock over IPv4")
        p.add_argument("-6", "--ipv6", action="store_true", help="knock over IPv6")
    g = sub.add_parser(  # no -c/-v: gen-key reads no config and has no steps to show
        "gen-key",
        help="print a new random key line for [KEYS]",
        description="Print 'USERID = KEY' with 32 random bytes from the OS CSPRNG, ready "
        "to paste into [KEYS] of both the client and the server configuration.",
    )
    g.add_argument(
        "-u", "--user", type=_hex_id, metavar="USER", help="user id (hex); default 00000000"
    )
    return parser


def gen_key(user: int | None) -> str:
    import secrets

    return f"{user or 0:08X} = {secrets.token_bytes(32).hex().upper()}"


def _load(path: str) -> Config:
    from fastknock.conf.config import load_config
    from fastknock.conf.permissions import permission_warnings
    from fastknock.errors import ConfigError

    try:
        config = load_config(path, role="client")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    for warning in permission_warnings(path, config, "client"):
        print(f"fastknock: warning: {warning}", file=sys.stderr)
    return config


def _pick_resource(config: Config, args: argparse.Namespace, user: int) -> int:
    from fastknock.conf.config import PortResource

    if args.resource is not None:
        return int(args.resource)
    if args.port is None:
        raise UsageError("give the PORT to open or a resource id with -r")
    found = [
        r
        for r in config.resources.values()
        if isinstance(r, PortResource) and args.port in r.ports and config.allowed(user, r)
    ]
    if not found:
        raise UsageError(
            f"{config.source}: no resource for port {args.port} (user {user:08X}) in [RESOURCES]"
        )
    if len(found) > 1:
        ids = ", ".join(f"{r.id:08X}" for r in found)
        raise UsageError(f"port {args.port} matches several resources ({ids}): choose with -r")
    return found[0].id


def _targets(args: argparse.Namespace, config: Config) -> tuple[list[Target], bool]:
    """Addresses to knock, and whether all of them must succeed."""
    import socket

    from fastknock.knock.client import Target

    port = args.server_port or config.port
    udp = bool(args.udp or (not args.tcp and config.port_udp and not config.port_tcp))
    # Both offered: TCP is preferred; a UDP knock (-U) that gets no answer falls back to it.
    fallback = udp and config.port_tcp and config.port_udp
    families = [f for f, on in ((socket.AF_INET6, args.ipv6), (socket.AF_INET, args.ipv4)) if on]
    want = families or [socket.AF_INET6, socket.AF_INET]
    try:
        infos = socket.getaddrinfo(args.host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise KnockFailed([f"cannot resolve {args.host}: {exc.strerror}"]) from None
    targets: list[Target] = []
    for family in want:
        for info in infos:
            if info[0] == family:
                targets.append(Target(str(info[4][0]), family, port, udp, fallback))
                break
    if not targets:
        names = "/".join("IPv6" if f == socket.AF_INET6 else "IPv4" for f in want)
        raise KnockFailed([f"{args.host} has no {names} address"])
    if len(families) == 2 and len(targets) < 2:
        raise KnockFailed([f"{args.host} lacks an IPv4 or an IPv6 address (-4 -6 need both)"])
    return targets, len(families) == 2


def knock(args: argparse.Namespace, config: Config) -> None:
    import threading

    from fastknock.knock.client import run_session
    from fastknock.mac import HmacKey
    from fastknock.message import Operation

    user = args.user if args.user is not None else config.default_user
    if user is None:
        raise UsageError(f"no user: give -u USER or set [CLIENT] default-user in {config.source}")
    raw_key = config.keys.get(user)
    if raw_key is None:
        raise UsageError(f"{config.source}: no key for user {user:08X} in [KEYS]")
    resource = _pick_resource(config, args, user)
    targets, need_all = _targets(args, config)
    key = HmacKey(raw_key)
    operation = Operation.KNOCK if args.command == "knock" else Operation.REVOKE
    verbose = getattr(args, "verbose", False)

    def log(line: str) -> None:
        if verbose:
            print(f"fastknock: {line}", file=sys.stderr, flush=True)

    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            run_session(targets[i], key, user, resource, operation, config.control_timeout, log)
        except KnockError as exc:
            errors[i] = str(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [errors[i] for i in sorted(errors)]
    if len(failed) == len(targets) or (need_all and failed):
        raise KnockFailed([f"{args.command} failed: {line}" for line in failed])
    for line in failed:
        log(f"{args.command} failed (another address succeeded): {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot put an optional positional after options ("knock HOST -4 22"): allow it.
    if extra and getattr(args, "port", 0) is None and len(extra) == 1:
        try:
            args.port = _port(extra[0])
            extra = []
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "gen-key":
            print(gen_key(args.user))
            return 0
        from fastknock.conf.config import DEFAULT_CLIENT_CONFIG

        config = _load(getattr(args, "config", DEFAULT_CLIENT_CONFIG))
        knock(args, config)
        return 0
    except UsageError as exc:
        print(f"fastknock: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KnockFailed as exc:
        for line in exc.lines:
            print(f"fastknock: {line}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
