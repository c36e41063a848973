"""SIGHUP reload parses the new config off the event loop, in both daemons.

A real SIGHUP reaches the daemon's real handler (fastknockd: inside ``server.serve``;
fastknockfwd: its ``_reload`` coroutine) while ``load_config`` is replaced by a loader that
blocks until the *event loop* releases it. Parsed on the loop (the old code), nothing can
release it: the loader waits out its bound and records that. Parsed in a thread, the loop
releases it at once. The bound (30 s) is a hang guard, never a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from fastknock import fwd, server
from fastknock.conf.config import load_config, parse_config
from tests.e2e_support import port_res, server_config

HANG_GUARD = 30.0


class BlockingLoader:
    """``load_config`` stand-in: the first ``skip`` calls pass through, later ones block
    until ``release`` is set (by the loop) and record whether it was."""

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip
        self.parsing = threading.Event()
        self.release = threading.Event()
        self.released_by_loop: list[bool] = []

    def __call__(self, path: Any, role: Any) -> Any:
        if self.skip:
            self.skip -= 1
            return load_config(path, role)
        self.parsing.set()
        self.released_by_loop.append(self.release.wait(HANG_GUARD))
        return load_config(path, role)

    async def release_from_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, self.parsing.wait, HANG_GUARD)
        self.release.set()  # runs only if the loop is free while the loader blocks


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "fastknockd.conf"
    path.write_text(server_config([port_res(0x22, 22)], "basic-auth"))
    path.chmod(0o600)
    return path


def test_fastknockd_reload_parses_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conf = _config(tmp_path)
    config = load_config(conf, "server")
    loader = BlockingLoader()
    monkeypatch.setattr(server, "load_config", loader)
    args = server.build_parser().parse_args(["-c", str(conf), "--rundir", str(tmp_path),
                                             "--no-systemd"])  # fmt: skip
    args.seccomp_mode = "off"
    caplog.set_level(logging.INFO, "fastknockd")

    async def main() -> None:
        task = asyncio.create_task(server.serve(config, args, (None, None)))
        while "listening on port" not in caplog.text:  # the handlers are in place
            if task.done():
                task.result()  # serve() failed: raise its error
            await asyncio.sleep(0.01)
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        signal.raise_signal(signal.SIGHUP)
        await loader.release_from_loop()
        while "reloaded" not in caplog.text:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert loader.released_by_loop == [True]


def test_fastknockfwd_reload_parses_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The firewall daemon's reload; the new config then fails the firewall set-up here
    (no nftables runner in this test), which the reload reports as a failure: the point is
    only where the parse ran."""
    conf = _config(tmp_path)
    loader = BlockingLoader()
    monkeypatch.setattr(fwd.configmod, "load_config", loader)
    args = argparse.Namespace(config=str(conf), no_systemd=True)

    class NoFirewall:
        runner = None

    class StubDaemon:
        fw = NoFirewall()

    async def main() -> None:
        task = asyncio.create_task(fwd._reload(args, StubDaemon()))  # type: ignore[arg-type]
        await loader.release_from_loop()
        try:
            await task
        except Exception:  # noqa: BLE001 -- the stub firewall cannot be set up
            pass

    asyncio.run(main())
    assert loader.released_by_loop == [True]
    assert parse_config(conf.read_bytes(), str(conf), "server").resources  # the file was fine
