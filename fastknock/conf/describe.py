"""What ``fastknockd --check-config`` prints about a config: ports, users, resources and
the nftables settings; never a key (only user ids appear).

One function per thing described, so each config extension adds its line here and nowhere
else.
"""

from __future__ import annotations

from fastknock.conf.model import Config, PortResource

__all__ = ["summary"]


def summary(config: Config) -> str:
    """What --check-config prints: ports, users and resources; never a key."""
    protos = ",".join(p for p, on in (("udp", config.port_udp), ("tcp", config.port_tcp)) if on)
    lines = [
        f"config {config.source}: OK",
        f"control port {config.port}/{protos}, timeout {config.control_timeout:g} s, "
        f"error policy {config.control_error_policy.value}, seccomp {config.seccomp.value}",
        f"users ({len(config.keys)}): " + " ".join(f"{u:08X}" for u in sorted(config.keys)),
        f"resources ({len(config.resources)}):",
    ]
    for rid, res in sorted(config.resources.items()):
        users = "all" if res.users is None else ",".join(f"{u:08X}" for u in sorted(res.users))
        timeout = f"{res.timeout} s" if res.timeout is not None else "default"
        if isinstance(res, PortResource):
            last = "" if res.port_last is None else f"-{res.port_last}"
            what = f"port {res.port}{last}/" + ",".join(
                p for p, on in (("tcp", res.tcp), ("udp", res.udp)) if on
            )
        else:
            what = "jump " + " ".join(
                f"{hook}:{chain}" for hook, chain in
                (("input", res.input), ("forward", res.forward), ("output", res.output)) if chain
            )  # fmt: skip
        if (res.ipv4_prefix, res.ipv6_prefix) != (32, 128):  # issue 15's prefix opens
            what += f"  opens the knocker's IPv4 /{res.ipv4_prefix}, IPv6 /{res.ipv6_prefix}"
        lines.append(f"  {rid:08X}  {what}  users {users}  timeout {timeout}")
    if config.nftables is not None:
        n = config.nftables
        lines.append(
            f"nftables {n.family} {n.table} input {n.chain_input}, lease timeout {n.timeout} s, "
            f"max-nr-rules {n.max_nr_rules}"
        )
    lines += hooks(config)
    return "\n".join(lines)


def hooks(config: Config) -> list[str]:
    """[HOOKS]: the programs, not their arguments (an argument may hold a token)."""
    h = config.hooks
    if h is None:
        return []

    def cmd(argv: tuple[str, ...] | None) -> str:
        return "none" if argv is None else f"{argv[0]} (+{len(argv) - 1} argument(s))"

    return [f"hooks: on-open {cmd(h.on_open)}, on-close {cmd(h.on_close)}, as {h.user}, "
            f"timeout {h.timeout:g} s"]  # fmt: skip
