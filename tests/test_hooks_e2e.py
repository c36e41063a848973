"""[HOOKS] end to end (issue 15 part 3): the real daemons in veth namespaces, both under
``seccomp = kill``, the real client, real nft.

The hook is ``/bin/sh hook.sh OUT``: it writes ``id -u; id -g; id -G`` and its environment
exactly as exec'd (``/proc/$$/environ``) to OUT, a directory only the hook account
(``daemon``, distinct from the daemons' ``nobody``) can write, one file pair per run, named
for the event. What the tests prove: each event fires once with the right environment, as
the hook account; a re-knock that only refreshes fires nothing (ordering argument: one
knock-lease's hooks run in order, so once its on-close is there, a second on-open would be
there too); expiry of a port lease (in the kernel) and of a jump lease (the daemon's sweep)
fires on-close; a lease that expired while fastknockfwd was stopped fires on-close at the
next start, and one still open does not; a hook that hangs (with a child in its process
group) is killed after hook-timeout and counted, while knocks keep working (control: the
same knocks on a resource whose hook does not hang).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastknock.firewall import hookrun
from tests import netns
from tests.e2e_support import (
    FWD_USER,
    REPO,
    USER1,
    Res,
    Stack,
    jump_res,
    port_res,
    read_metrics,
    wait_for,
)

pytestmark = pytest.mark.e2e

HOOK_USER = "daemon"  # uid 1 on Debian: neither root nor the daemons' account
R_OPEN = port_res(0x601, 2801)  # the default lease timeout (600 s)
R_EXP = port_res(0x602, 2802, " / timeout: 2")
R_JUMP = jump_res(0x603, "MYCHAIN-INPUT", 2803, " / timeout: 2")
R_HANG = port_res(0x604, 2804)
R_CTRL = port_res(0x605, 2805)
HOOK_SH = """#!/bin/sh
out="$1/$FASTKNOCK_EVENT.$FASTKNOCK_RESOURCE.$$"
if [ "$FASTKNOCK_RESOURCE" = "00000604" ]; then  # R_HANG: hang, with a child in the group
    sleep 1000 &
    echo "$$ $!" > "$1/hang.$$.pids"
    wait
fi
{ id -u; id -g; id -G; } > "$out.tmp"
cat /proc/$$/environ > "$out.env"
mv "$out.tmp" "$out.id"
"""


class Hooks:
    """A directory the hook account can use: the hook script, its output, the state dir."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fk-hooks-"))
        os.chmod(self.root, 0o755)  # noqa: S103 -- the hook account reads the script
        self.script = self.root / "hook.sh"
        self.script.write_text(HOOK_SH)
        self.out = self.root / "out"
        self.out.mkdir(mode=0o700)
        acct = pwd.getpwnam(HOOK_USER)
        self.uid, self.gid = acct.pw_uid, acct.pw_gid
        os.chown(self.out, self.uid, self.gid)
        self.metrics_dir = self.root / "metrics"
        self.metrics_dir.mkdir()
        fwd = pwd.getpwnam(FWD_USER)
        os.chown(self.metrics_dir, fwd.pw_uid, fwd.pw_gid)
        self.metrics = self.metrics_dir / "fastknockfwd.prom"
        self.statedir = self.root / "state"

    def config(self, timeout: float = 10.0) -> str:
        cmd = f"/bin/sh {self.script} {self.out}"
        return (
            f"\n[HOOKS]\non-open = {cmd}\non-close = {cmd}\nhook-user = {HOOK_USER}\n"
            f"hook-timeout = {timeout}\n"
        )

    def fwd_args(self) -> tuple[str, ...]:
        return ("--seccomp", "kill", "--statedir", str(self.statedir), "--metrics-file",
                str(self.metrics), "--metrics-interval", "0.1")  # fmt: skip

    def runs(self, event: str, res: Res) -> list[tuple[list[str], dict[str, str]]]:
        """(``id`` lines, environment) of each finished run of ``event`` for ``res``."""
        found = []
        for ident in sorted(self.out.glob(f"{event}.{res.id:08X}.*.id")):
            env_text = ident.with_suffix(".env").read_text()
            env = dict(kv.split("=", 1) for kv in env_text.split("\0") if kv)
            found.append((ident.read_text().split("\n"), env))
        return found

    def wait_runs(self, event: str, res: Res, n: int) -> list[tuple[list[str], dict[str, str]]]:
        wait_for(f"{n} {event} hook(s) for {res.id:08X}", lambda: len(self.runs(event, res)) >= n)
        return self.runs(event, res)

    def fwd_metrics(self) -> dict[str, float]:
        return read_metrics(self.metrics)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def hook_stack(
    name: str, resources: list[Res], timeout: float = 10.0
) -> Iterator[tuple[Stack, Hooks]]:
    netns.require()
    hooks = Hooks()
    try:
        with Stack(
            name, resources, "basic-auth", 1.0, server_args=("--seccomp", "kill"),
            fwd_args=hooks.fwd_args(), config_extra=hooks.config(timeout),
        ) as stack:  # fmt: skip
            yield stack, hooks
    finally:
        hooks.close()


def expect_env(env: dict[str, str], event: str, res: Res, addr: str, port: str, timeout: int):
    assert env == {
        "FASTKNOCK_EVENT": event,
        "FASTKNOCK_USER": f"{USER1:08X}",
        "FASTKNOCK_RESOURCE": f"{res.id:08X}",
        "FASTKNOCK_ADDRESS": addr,
        "FASTKNOCK_PORT": port,
        "FASTKNOCK_TIMEOUT": str(timeout),
        "PATH": hookrun.MIN_PATH,
    }


def knock(stack: Stack, command: str, res: Res) -> None:
    k = stack.knock(command, stack.addrs(False)[0], "-r", f"{res.id:08X}", "-4")
    assert k.code == 0, f"fastknock {command} failed:\n{k.err}\n{stack.all_logs()}"


def assert_alive(stack: Stack) -> None:
    for d in (stack.server, stack.fwd):
        assert d is not None and d.alive(), stack.all_logs()
    assert "Traceback" not in stack.all_logs(), stack.all_logs()
    assert stack.fwd is not None and stack.server is not None
    assert "seccomp (kill) installed for fwd" in stack.fwd.text()
    assert "seccomp (kill) installed for server" in stack.server.text()


def test_hooks_fire_once_each_with_their_environment_as_the_hook_account() -> None:
    with hook_stack("hooks", [R_OPEN, R_EXP, R_JUMP]) as (stack, hooks):
        server, me, _ = stack.addrs(False)
        ids = [str(hooks.uid), str(hooks.gid), str(hooks.gid), ""]
        # Knock, re-knock (a refresh), revoke: one on-open, one on-close.
        knock(stack, "knock", R_OPEN)
        [(who, env)] = hooks.wait_runs("open", R_OPEN, 1)
        assert who == ids  # the hook account, not root and not the daemons' account
        expect_env(env, "open", R_OPEN, me, str(R_OPEN.probe), 600)
        knock(stack, "knock", R_OPEN)
        knock(stack, "revoke", R_OPEN)
        [(who, env)] = hooks.wait_runs("close", R_OPEN, 1)
        assert who == ids
        expect_env(env, "close", R_OPEN, me, str(R_OPEN.probe), 600)
        assert len(hooks.runs("open", R_OPEN)) == 1  # the re-knock fired nothing
        # Expiry: a port lease (the kernel drops it) and a jump lease (the daemon's sweep).
        knock(stack, "knock", R_EXP)
        knock(stack, "knock", R_JUMP)
        assert stack.connects(me, server, R_EXP.probe)
        [(_, env)] = hooks.wait_runs("open", R_EXP, 1)
        expect_env(env, "open", R_EXP, me, str(R_EXP.probe), 2)
        [(_, env)] = hooks.wait_runs("open", R_JUMP, 1)
        expect_env(env, "open", R_JUMP, me, "", 2)
        [(who, env)] = hooks.wait_runs("close", R_EXP, 1)
        assert who == ids
        expect_env(env, "close", R_EXP, me, str(R_EXP.probe), 2)
        assert not stack.connects(me, server, R_EXP.probe)  # on-close came after the kernel's
        [(_, env)] = hooks.wait_runs("close", R_JUMP, 1)
        expect_env(env, "close", R_JUMP, me, "", 2)
        wait_for("fastknockfwd's hook metrics", lambda: hooks.fwd_metrics().get(
            'fastknockfwd_hook_runs_total{result="ok"}') == 6)  # fmt: skip
        m = hooks.fwd_metrics()
        assert m['fastknockfwd_hook_events_total{event="open"}'] == 3
        assert m['fastknockfwd_hook_events_total{event="close"}'] == 3
        assert m['fastknockfwd_hook_runs_total{result="failed"}'] == 0
        assert m['fastknockfwd_hook_runs_total{result="timeout"}'] == 0
        assert m["fastknockfwd_hook_runner_up"] == 1
        assert len(list(hooks.out.glob("*.id"))) == 6  # nothing else ran
        assert_alive(stack)


def test_a_lease_that_expired_while_fwd_was_stopped_closes_at_its_next_start() -> None:
    with hook_stack("hookrestart", [R_OPEN, R_EXP]) as (stack, hooks):
        server, me, _ = stack.addrs(False)
        knock(stack, "knock", R_EXP)
        knock(stack, "knock", R_OPEN)
        hooks.wait_runs("open", R_EXP, 1)
        hooks.wait_runs("open", R_OPEN, 1)
        assert stack.fwd is not None
        assert stack.fwd.stop() == 0
        # The kernel expires the port lease while fastknockfwd is down.
        wait_for("the kernel to expire the lease", lambda: not stack.connects(me, server,
                 R_EXP.probe))  # fmt: skip
        assert hooks.runs("close", R_EXP) == []  # nobody ran it yet
        stack.start_fwd()
        [(_, env)] = hooks.wait_runs("close", R_EXP, 1)
        expect_env(env, "close", R_EXP, me, str(R_EXP.probe), 2)
        # fastknockfwd --list shows it with the kernel's leases.
        listed = netns.run(stack.pair.server, [sys.executable, "-m", "fastknock.fwd", "-c",
                           str(stack.server_conf), "--list", "--statedir", str(hooks.statedir)],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert "1 knock-lease(s) open for the hooks" in listed.stdout, listed.stdout
        assert f"{me:<40} user {USER1:08X} res {R_OPEN.id:08X} port {R_OPEN.probe}" in listed.stdout
        # Control: the lease still open survived the restart: no on-close, and a re-knock
        # is a refresh (its revoke's on-close is the first event after the open).
        knock(stack, "knock", R_OPEN)
        knock(stack, "revoke", R_OPEN)
        hooks.wait_runs("close", R_OPEN, 1)
        assert len(hooks.runs("open", R_OPEN)) == 1
        assert "hook lease record: 1 open, 1 closed while stopped" in stack.fwd.text()
        assert_alive(stack)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_hanging_hook_is_killed_after_hook_timeout_and_knocks_keep_working() -> None:
    with hook_stack("hookhang", [R_HANG, R_CTRL], timeout=1.0) as (stack, hooks):
        server, me, _ = stack.addrs(False)
        # Control: a resource whose hooks finish.
        knock(stack, "knock", R_CTRL)
        hooks.wait_runs("open", R_CTRL, 1)
        assert stack.connects(me, server, R_CTRL.probe)
        # Attack: hooks that hang (each with a child); knocks still open the port.
        for _ in range(3):
            knock(stack, "knock", R_HANG)
            assert stack.connects(me, server, R_HANG.probe)
            knock(stack, "revoke", R_HANG)
        knock(stack, "revoke", R_CTRL)
        hooks.wait_runs("close", R_CTRL, 1)
        wait_for("six timed-out hooks", lambda: hooks.fwd_metrics().get(
            'fastknockfwd_hook_runs_total{result="timeout"}') == 6)  # fmt: skip
        pids = [int(p) for f in hooks.out.glob("hang.*.pids") for p in f.read_text().split()]
        assert len(pids) == 12  # six hooks, each with its child
        wait_for("every hung process to be gone", lambda: all(_gone(p) for p in pids))
        m = hooks.fwd_metrics()
        assert m['fastknockfwd_hook_runs_total{result="ok"}'] == 2  # the control's two
        assert m['fastknockfwd_hook_events_total{event="open"}'] == 4
        assert "killed after 1 s" in stack.all_logs()
        knock(stack, "knock", R_CTRL)  # and afterwards everything works as before
        assert stack.connects(me, server, R_CTRL.probe)
        assert_alive(stack)
        stack.fwd.send_signal(signal.SIGUSR1)
        wait_for("the stats line", lambda: "hook_timed_out=6" in stack.fwd.text())
