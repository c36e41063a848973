"""The hook runner (firewall/hookrun.py) as the real process fastknockfwd starts
(``hookproc.start_runner``: fork, exec ``python -I``, drop to the hook account), running real
``/bin/sh`` hooks; and fastknockfwd's non-blocking end of its pipe (``hookproc.HookFeed``).

Codec fuzz invariant: any bytes -> an Event/Commands or a RecordError, never another
exception; any report bytes -> a report or None.
"""

from __future__ import annotations

import ast
import asyncio
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastknock.conf.model import HooksConfig
from fastknock.errors import ConfigError
from fastknock.firewall import hookproc, hookrun
from tests.e2e_support import wait_for

HOOK_USER = "daemon"
OPEN, CLOSE = hookrun.OPEN, hookrun.CLOSE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the runner as root")


def ev(kind: int = OPEN, user: int = 1, res: int = 0x22, addr: str = "192.0.2.7",
       port: str = "22", timeout: int = 600) -> hookrun.Event:  # fmt: skip
    return hookrun.Event(kind, user, res, addr, port, timeout)


# -- the codec -----------------------------------------------------------------------------------


def body(record: bytes) -> bytes:
    buf = bytearray(record)
    [b] = hookrun.split_records(buf)
    assert not buf
    return b


@pytest.mark.parametrize(
    "e",
    [ev(), ev(CLOSE, 0xFFFFFFFF, 0, "2001:db8::/64", "60000-61000", 1),
     ev(addr="203.0.113.0/24", port=""), ev(addr="::1", port="1-65535")],
)  # fmt: skip
def test_event_round_trip(e: hookrun.Event) -> None:
    assert hookrun.decode_body(body(hookrun.encode_event(e))) == e


@pytest.mark.parametrize(
    ("addr", "port"),
    [("192.0.2.7/24", "22"), ("x", "22"), ("192.0.2.7", "0"), ("192.0.2.7", "9-1"),
     ("192.0.2.7", "65536"), ("192.0.2.7", "22 "), ("192.0.2.7\n", "22")],
)  # fmt: skip
def test_events_with_bad_fields_are_refused_both_ways(addr: str, port: str) -> None:
    with pytest.raises(hookrun.RecordError):
        hookrun.encode_event(ev(addr=addr, port=port))
    good = body(hookrun.encode_event(ev()))
    n = good[hookrun._EV.size]
    forged = good[: hookrun._EV.size] + bytes([len(addr)]) + addr.encode() + bytes([len(port)])
    forged += port.encode()
    assert good[hookrun._EV.size + 1 : hookrun._EV.size + 1 + n] == b"192.0.2.7"  # the layout
    with pytest.raises(hookrun.RecordError):
        hookrun.decode_body(forged)


def test_config_round_trip_and_refusals() -> None:
    cmds = hookrun.Commands(("/bin/a", "x y"), None, 2.5)
    assert hookrun.decode_body(body(hookrun.encode_config(cmds))) == cmds
    for bad in (b'\x01{"on_open": ["rel"], "on_close": null, "timeout": 1}',
                b'\x01{"on_open": null, "on_close": null, "timeout": 0}',
                b'\x01{"on_open": null, "on_close": null}', b"\x01[]", b"\x01\xff"):  # fmt: skip
        with pytest.raises(hookrun.RecordError):
            hookrun.decode_body(bad)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_record_bytes_decode_or_raise_record_error(data: bytes) -> None:
    try:
        hookrun.decode_body(data)
    except hookrun.RecordError:
        pass
    assert hookrun.decode_report(data) is None or len(data) == hookrun.REPORT.size


def test_the_runner_imports_only_the_standard_library() -> None:
    """It runs as ``python -I``: nothing of fastknock (nor PYTHONPATH) is importable there."""
    tree = ast.parse(Path(hookrun.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}  # fmt: skip
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}  # fmt: skip
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names


# -- the runner process --------------------------------------------------------------------------


class Dir:
    """A directory the hook account can read (scripts) with an output dir it can write."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fk-runner-"))
        os.chmod(self.root, 0o755)  # noqa: S103
        self.out = self.root / "out"
        self.out.mkdir()
        pw = pwd.getpwnam(HOOK_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        os.chown(self.out, self.uid, self.gid)

    def script(self, name: str, text: str) -> tuple[str, ...]:
        path = self.root / name
        path.write_text("#!/bin/sh\n" + text)
        return ("/bin/sh", str(path), str(self.out))


@pytest.fixture
def d() -> Iterator[Dir]:
    made = Dir()
    try:
        yield made
    finally:
        shutil.rmtree(made.root, ignore_errors=True)


RECORD = (
    'n="$1/$FASTKNOCK_EVENT.$$"; { id -u; id -g; id -G; } > "$n.id"; '
    'cat /proc/$$/environ > "$n.env"\n'
)


def start(cmd: tuple[str, ...] | None, close: tuple[str, ...] | None = None,
          timeout: float = 10.0) -> hookproc.HookFeed:  # fmt: skip
    return hookproc.start_runner(hookproc.hook_account(HOOK_USER),
                                 HooksConfig(cmd, close, HOOK_USER, timeout))  # fmt: skip


def report(feed: hookproc.HookFeed, **want: int) -> dict[str, int]:
    def done() -> bool:
        feed.poll_reports()
        return all(feed.runner[k] == v for k, v in want.items())

    wait_for(f"runner report {want}", done, 60)
    return feed.runner


def finish(feed: hookproc.HookFeed) -> None:
    """EOF to the runner; wait for it to exit (it is our child here: reap it)."""
    feed.close()
    os.waitpid(feed.pid, 0)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_runs_as_the_hook_account_with_exactly_its_environment(d: Dir) -> None:
    feed = start(d.script("rec.sh", RECORD), d.script("rec.sh", RECORD))
    try:
        st_ = _status(feed.pid)  # the runner itself: the hook account, no capability, NNP
        assert st_["Uid"].split() == [str(d.uid)] * 4 and st_["Gid"].split() == [str(d.gid)] * 4
        assert int(st_["CapEff"], 16) == int(st_["CapPrm"], 16) == 0 and st_["NoNewPrivs"] == "1"
        feed.send(hookrun.encode_event(ev(addr="203.0.113.0/24", port="60000-61000")))
        feed.send(hookrun.encode_event(ev(CLOSE, port="")))
        report(feed, started=2, ok=2)
    finally:
        finish(feed)
    [open_env] = d.out.glob("open.*.env")
    env = dict(kv.split("=", 1) for kv in open_env.read_text().split("\0") if kv)
    assert env == {"FASTKNOCK_EVENT": "open", "FASTKNOCK_USER": "00000001",
                   "FASTKNOCK_RESOURCE": "00000022", "FASTKNOCK_ADDRESS": "203.0.113.0/24",
                   "FASTKNOCK_PORT": "60000-61000", "FASTKNOCK_TIMEOUT": "600",
                   "PATH": hookrun.MIN_PATH}  # fmt: skip
    [close_env] = d.out.glob("close.*.env")
    assert "FASTKNOCK_PORT=\0" in close_env.read_text()
    for ident in d.out.glob("*.id"):
        assert ident.read_text().split() == [str(d.uid), str(d.gid), str(d.gid)]


def test_failures_are_counted(d: Dir) -> None:
    feed = start(d.script("fail.sh", "exit 3\n"), ("/nonexistent/hook",))
    try:
        feed.send(hookrun.encode_event(ev()))
        feed.send(hookrun.encode_event(ev(CLOSE)))
        r = report(feed, started=2)
        r = report(feed, failed=2)
        assert (r["ok"], r["timed_out"]) == (0, 0)
    finally:
        finish(feed)


def test_a_hook_is_killed_with_its_process_group_after_the_timeout(d: Dir) -> None:
    hang = d.script("hang.sh", 'sleep 1000 & echo "$$ $!" > "$1/pids"; wait\n')
    feed = start(hang, d.script("rec.sh", RECORD), timeout=0.5)
    try:
        feed.send(hookrun.encode_event(ev()))
        feed.send(hookrun.encode_event(ev(CLOSE)))  # the same lease: waits for the open
        r = report(feed, timed_out=1, ok=1)
        assert (r["started"], r["failed"]) == (2, 0)
        pids = [int(p) for p in (d.out / "pids").read_text().split()]
        assert len(pids) == 2

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True

        wait_for("the hook and its child to be gone", lambda: all(gone(p) for p in pids))
        assert len(list(d.out.glob("close.*.id"))) == 1  # ran after the killed open
    finally:
        finish(feed)


def test_the_runners_queue_is_bounded_and_drops_are_counted(d: Dir) -> None:
    wait = d.script("wait.sh", 'while [ ! -e "$1/go" ]; do sleep 0.05; done\n')
    feed = start(wait, timeout=120)
    n = hookrun.MAX_QUEUED + 10
    try:
        for i in range(n):  # every one a distinct lease: MAX_RUNNING run, the rest wait
            feed.send(hookrun.encode_event(ev(user=i)))
        report(feed, started=hookrun.MAX_RUNNING, dropped=10)
        (d.out / "go").touch()  # release them all
        r = report(feed, ok=hookrun.MAX_QUEUED)
        assert (r["started"], r["dropped"], r["failed"]) == (hookrun.MAX_QUEUED, 10, 0)
    finally:
        (d.out / "go").touch()
        finish(feed)


def test_events_of_one_lease_run_in_order(d: Dir) -> None:
    log = d.script("log.sh", 'echo "$FASTKNOCK_EVENT start" >> "$1/log"; sleep 0.2; '
                   'echo "$FASTKNOCK_EVENT end" >> "$1/log"\n')  # fmt: skip
    feed = start(log, log)
    try:
        for kind in (OPEN, CLOSE, OPEN, CLOSE):
            feed.send(hookrun.encode_event(ev(kind)))
        report(feed, ok=4)
    finally:
        finish(feed)
    assert (d.out / "log").read_text().split("\n")[:-1] == [
        f"{e} {p}" for e in ("open", "close", "open", "close") for p in ("start", "end")
    ]


def test_the_runner_refuses_root_and_the_account_lookup_too() -> None:
    r, w = os.pipe()
    try:
        argv = [sys.executable, "-I", hookrun.__file__, str(r), str(w), "0", "0", "0"]
        proc = subprocess.run(argv, pass_fds=(r, w), capture_output=True, text=True, timeout=60)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 2 and "refusing to run hooks as uid or gid 0" in proc.stderr
    with pytest.raises(ConfigError, match="hooks never run as root"):
        hookproc.hook_account("root")
    with pytest.raises(ConfigError, match="does not exist"):
        hookproc.hook_account("fk-no-such-account")
    assert hookproc.hook_account(HOOK_USER).uid == pwd.getpwnam(HOOK_USER).pw_uid  # control


# -- fastknockfwd's end --------------------------------------------------------------------------


def test_the_feed_never_blocks_and_drops_beyond_its_bound() -> None:
    """A runner that reads nothing: the pipe fills, then MAX_PENDING records wait, the rest
    are dropped and counted; what the pipe holds is whole records in order."""
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    feed = hookproc.HookFeed(0, cmd_w, rep_r, HOOK_USER)

    async def flood() -> int:
        sent = 0
        for i in range(20000):
            sent += feed.send(hookrun.encode_event(ev(user=i)))
        return sent

    try:
        sent = asyncio.run(flood())
        assert feed.dropped == 20000 - sent > 0
        assert len(feed.queue) == hookproc.MAX_PENDING
        os.set_blocking(cmd_r, False)
        data = bytearray()
        while True:
            try:
                chunk = os.read(cmd_r, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        users = [hookrun.decode_body(b).user for b in hookrun.split_records(data)]  # type: ignore[union-attr]
        assert users == list(range(len(users))) and not data
        assert len(users) + hookproc.MAX_PENDING == sent  # in the pipe, or still waiting
    finally:
        feed.close()
        for fd in (cmd_r, rep_w):
            os.close(fd)


def test_reports_are_hostile_numbers() -> None:
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    feed = hookproc.HookFeed(0, cmd_w, rep_r, HOOK_USER)
    try:
        good = hookrun.encode_report(dict.fromkeys(hookrun.REPORT_FIELDS, 7))
        os.write(rep_w, good)
        feed.poll_reports()
        assert feed.runner["ok"] == 7 and feed.bad_reports == 0  # control
        os.write(rep_w, good[:-1])  # not a whole report
        feed.poll_reports()
        os.write(rep_w, b"XXXX" + good[4:])  # bad magic
        feed.poll_reports()
        assert feed.bad_reports == 2 and feed.runner["ok"] == 7 and feed.up
        os.close(rep_w)
        rep_w = -1
        feed.poll_reports()  # EOF: the runner is gone; records are now dropped
        assert not feed.up and not feed.send(hookrun.encode_event(ev()))
    finally:
        feed.close()
        os.close(cmd_r)
        if rep_w >= 0:
            os.close(rep_w)
