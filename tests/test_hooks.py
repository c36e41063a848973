"""Which hook events fastknockfwd fires (firewall/hooks.py), driven through the real
``Daemon.submit`` against the fake firewall of test_fwd.py with an explicit clock; the events
are read back from the real pipe the runner would read. And the record of open knock-leases:
round trip, and hostile files (links, FIFOs, garbage) that must neither crash nor mislead."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from fastknock.conf.model import Config, HooksConfig, JumpResource, PortResource
from fastknock.firewall import hookproc, hookrun, hooks
from fastknock.firewall.daemon import Daemon
from fastknock.ipc import FwOp, FwStatus
from fastknock.osutil import metrics, runfiles
from tests.test_fwd import USER, USER2, daemon, make_config, req

ADDR = ipaddress.ip_address


# -- FASTKNOCK_ADDRESS / FASTKNOCK_PORT: one function -----------------------------------------


@pytest.mark.parametrize(
    ("res", "addr", "want"),
    [
        (PortResource(1, 22), "203.0.113.7", ("203.0.113.7", "22")),
        (PortResource(1, 60000, udp=True, port_last=61000), "203.0.113.7",
         ("203.0.113.7", "60000-61000")),
        (PortResource(1, 22, port_last=22), "203.0.113.7", ("203.0.113.7", "22")),
        (PortResource(1, 22, ipv4_prefix=24), "203.0.113.7", ("203.0.113.0/24", "22")),
        (PortResource(1, 22, ipv4_prefix=24), "2001:db8::1", ("2001:db8::1", "22")),
        (PortResource(1, 22, ipv6_prefix=64), "2001:db8:0:1:aaaa::1", ("2001:db8:0:1::/64", "22")),
        (PortResource(1, 22, ipv4_prefix=32, ipv6_prefix=128), "::1", ("::1", "22")),
        (JumpResource(1, input="X", input_match_saddr=True), "192.0.2.1", ("192.0.2.1", "")),
        (JumpResource(1, input="X", input_match_saddr=True, ipv4_prefix=16), "192.0.2.1",
         ("192.0.0.0/16", "")),
    ],
)  # fmt: skip
def test_target(res: PortResource | JumpResource, addr: str, want: tuple[str, str]) -> None:
    assert hooks.target(res, ADDR(addr)) == want
    hookrun.encode_event(hookrun.Event(1, 1, 1, *want, 1))  # and the runner takes it


# -- events from the daemon's answers ---------------------------------------------------------


class Pipe:
    """The runner's end of a real pipe: what fastknockfwd sent, decoded."""

    def __init__(self) -> None:
        self.r, w = os.pipe()
        rep_r, self.rep_w = os.pipe()
        self.feed = hookproc.HookFeed(0, w, rep_r, "nobody")
        os.set_blocking(self.r, False)
        self.buf = bytearray()

    def events(self) -> list[tuple[str, int, int, str, str, int]]:
        try:
            self.buf += os.read(self.r, 1 << 20)
        except BlockingIOError:
            pass
        out = []
        for body in hookrun.split_records(self.buf):
            e = hookrun.decode_body(body)
            assert isinstance(e, hookrun.Event)
            out.append((hookrun.EVENT_NAMES[e.event], e.user, e.resource, e.address, e.port,
                        e.timeout))  # fmt: skip
        return out

    def close(self) -> None:
        self.feed.close()
        os.close(self.r)
        os.close(self.rep_w)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    try:
        yield p
    finally:
        p.close()


def with_hooks(pipe: Pipe, now: list[float], cfg: Config | None = None) -> Daemon:
    d = daemon(cfg, now)
    d.hooks = hooks.HookLeases(pipe.feed, None, clock=lambda: now[0], boot="b")
    return d


def run(d: Daemon, *requests: object) -> list[FwStatus]:
    async def go() -> list[FwStatus]:
        return [await d.submit(r) for r in requests]  # type: ignore[arg-type]

    return asyncio.run(go())


def test_open_once_refresh_silent_revoke_closes(pipe: Pipe) -> None:
    now = [1000.0]
    d = with_hooks(pipe, now)
    assert run(d, req(1), req(1)) == [FwStatus.ACK] * 2
    assert pipe.events() == [("open", USER, 1, "192.0.2.1", "22", 600)]  # the refresh: nothing
    now[0] += 500  # the refresh moved the deadline: still open at 1000+500+...
    assert run(d, req(1)) == [FwStatus.ACK]
    now[0] += 500
    assert d.hooks is not None
    d.hooks.expire()
    assert pipe.events() == []  # 1000 after the first knock, but 500 after the last refresh
    assert run(d, req(1, op=FwOp.REVOKE), req(1, op=FwOp.REVOKE)) == [FwStatus.ACK] * 2
    assert pipe.events() == [("close", USER, 1, "192.0.2.1", "22", 600)]  # once


def test_refused_or_failed_requests_fire_nothing(pipe: Pipe) -> None:
    now = [1000.0]
    d = with_hooks(pipe, now)
    fw = d.fw
    fw.fail = {next(iter(d.validate(req(1, "192.0.2.9"))), None).key}  # type: ignore[attr-defined, union-attr]
    statuses = run(d, req(3), req(5), req(1, "192.0.2.9"), req(1, op=FwOp.REVOKE))
    assert statuses == [FwStatus.BAD_PORT, FwStatus.USER_NOT_ALLOWED, FwStatus.FIREWALL_ERROR,
                        FwStatus.ACK]  # fmt: skip
    assert pipe.events() == []  # the revoke ACK was of a lease that did not exist
    assert run(d, req(2)) == [FwStatus.ACK]  # control
    assert pipe.events() == [("open", USER, 2, "192.0.2.1", "53", 30)]


def test_expiry_closes_and_a_late_reknock_is_a_new_open(pipe: Pipe) -> None:
    now = [1000.0]
    d = with_hooks(pipe, now)
    assert d.hooks is not None
    run(d, req(2), req(2, "192.0.2.2"))
    pipe.events()
    now[0] += 30
    run(d, req(2))  # past its deadline, not yet ticked: close first, then a new open
    assert pipe.events() == [("close", USER, 2, "192.0.2.1", "53", 30),
                             ("open", USER, 2, "192.0.2.1", "53", 30)]  # fmt: skip
    d.hooks.expire()
    assert pipe.events() == [("close", USER, 2, "192.0.2.2", "53", 30)]
    assert d.stats["hook_opens"] == 3 and d.stats["hook_closes"] == 2
    assert d.stats["hook_leases"] == 1


def test_two_holders_of_one_prefix_each_get_their_events(pipe: Pipe) -> None:
    base = make_config()
    res = dict(base.resources)
    res[7] = PortResource(7, 2222, ipv4_prefix=24)
    cfg = dataclasses.replace(base, resources=MappingProxyType(res))
    now = [1000.0]
    d = with_hooks(pipe, now, cfg)
    run(d, req(7, "198.51.100.7"), req(7, "198.51.100.9", user=USER2))
    run(d, req(7, "198.51.100.7", op=FwOp.REVOKE))
    assert pipe.events() == [
        ("open", USER, 7, "198.51.100.0/24", "2222", 600),
        ("open", USER2, 7, "198.51.100.0/24", "2222", 600),
        ("close", USER, 7, "198.51.100.0/24", "2222", 600),  # the other holder stays open
    ]


def test_hook_counters_reach_the_metrics(pipe: Pipe) -> None:
    now = [1000.0]
    d = with_hooks(pipe, now)
    run(d, req(1))
    text = metrics.render(d.metric_families())
    assert 'fastknockfwd_hook_events_total{event="open"} 1' in text
    assert "fastknockfwd_hook_runner_up 1" in text
    assert "hook_opens" in d.stats
    assert "fastknockfwd_hook" not in metrics.render(daemon().metric_families())  # control


# -- the record -----------------------------------------------------------------------------


def lease(deadline: float, addr: str = "192.0.2.1") -> hooks.Lease:
    return hooks.Lease(USER, 1, addr, addr, "22", 600, deadline)


@pytest.fixture
def statedir(tmp_path: Path) -> Iterator[runfiles.RunDir]:
    d = runfiles.RunDir(str(tmp_path / "state"), 0o700)
    try:
        yield d
    finally:
        d.close()


def restored(
    pipe: Pipe, statedir: runfiles.RunDir, now: float, boot: str = "b"
) -> hooks.HookLeases:
    h = hooks.HookLeases(pipe.feed, statedir, clock=lambda: now, boot=boot)
    h.restore()
    return h


def test_record_round_trip_closes_what_expired_while_stopped(
    pipe: Pipe, statedir: runfiles.RunDir
) -> None:
    hooks.save_record(statedir, "b", [lease(900.0, "192.0.2.1"), lease(2000.0, "192.0.2.2")])
    h = restored(pipe, statedir, 1000.0)
    assert pipe.events() == [("close", USER, 1, "192.0.2.1", "22", 600)]
    assert list(h.open) == [(USER, 1, "192.0.2.2")]


def test_record_from_another_boot_closes_everything(pipe: Pipe, statedir: runfiles.RunDir) -> None:
    hooks.save_record(statedir, "old-boot", [lease(2000.0)])
    h = restored(pipe, statedir, 1000.0, boot="new-boot")
    assert pipe.events() == [("close", USER, 1, "192.0.2.1", "22", 600)] and not h.open


GOOD = json.dumps({"version": 1, "boot_id": "b", "leases": [dataclasses.asdict(lease(500.0))]})


def _plant(path: Path, kind: str, tmp: Path) -> None:
    if kind == "symlink":  # a valid record, but reached through a link
        (tmp / "elsewhere.json").write_text(GOOD)
        path.symlink_to(tmp / "elsewhere.json")
    elif kind == "hardlink":
        (tmp / "elsewhere.json").write_text(GOOD)
        os.link(tmp / "elsewhere.json", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(hooks.MAX_RECORD_BYTES + 1)
    else:
        path.write_bytes(kind.encode())


@pytest.mark.parametrize(
    "kind",
    ["symlink", "hardlink", "fifo", "directory", "huge", "", "\xff", "null", "[]", "{}",
     "[" * 100000, '{"version": 1, "boot_id": "b", "leases": [{}]}',
     GOOD.replace('"user": 305419896', '"user": true'),
     GOOD.replace('"user": 305419896', '"user": -1'),
     GOOD.replace('"deadline": 500.0', '"deadline": NaN'),
     GOOD.replace('"subject": "192.0.2.1"', '"subject": "\\u001b[2J"'),
     GOOD.replace('"port": "22"', '"port": "9-1"'),
     GOOD.replace('"addr": "192.0.2.1"', '"addr": "192.0.2.1/24"'),
     GOOD.replace('"version": 1', '"version": 2'),
     GOOD.replace('}]}', '}], "extra": 1}')],
)  # fmt: skip
def test_a_hostile_record_is_ignored_not_followed(
    kind: str,
    pipe: Pipe,
    statedir: runfiles.RunDir,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _plant(Path(statedir.path) / hooks.RECORD_NAME, kind, tmp_path)
    with caplog.at_level(logging.WARNING, "fastknockfwd"):
        h = restored(pipe, statedir, 1000.0)
    assert not h.open and pipe.events() == []
    assert "ignoring the hook lease record" in caplog.text
    assert "\x1b" not in caplog.text
    if kind == "directory":  # cannot be replaced: the daemon logs each failed save
        with pytest.raises(IsADirectoryError):
            h.save()
        return
    h.save()  # the next save replaces it with a regular file (never through the link)
    assert hooks.load_record(statedir.fd) == ("b", [])
    if kind in ("symlink", "hardlink"):
        assert (tmp_path / "elsewhere.json").read_text() == GOOD


def test_the_good_record_control(pipe: Pipe, statedir: runfiles.RunDir) -> None:
    (Path(statedir.path) / hooks.RECORD_NAME).write_text(GOOD)
    restored(pipe, statedir, 1000.0)
    assert pipe.events() == [("close", USER, 1, "192.0.2.1", "22", 600)]


def test_a_reload_sends_the_new_commands(pipe: Pipe) -> None:
    h = hooks.HookLeases(pipe.feed, None, boot="b")
    h.reconfigure(HooksConfig(("/bin/new",), None, "nobody", 3.0))
    h.reconfigure(None)  # [HOOKS] removed: the runner runs nothing
    pipe.buf += os.read(pipe.r, 1 << 16)
    got = [hookrun.decode_body(b) for b in hookrun.split_records(pipe.buf)]
    assert got == [hookrun.Commands(("/bin/new",), None, 3.0), hookrun.Commands(None, None, 10.0)]
