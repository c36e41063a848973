"""Neither daemon keeps raw keys once it no longer needs them (issue 12, finding 5).

fastknockd needs the keys only to build its key ring (pre-absorbed HMAC states): once the
ring is built, ``Config.keys`` is replaced by the user ids alone. fastknockfwd never needs a
key: its loader drops them as it reads the file. Checked on the live objects: no ``Config``
read from the test's file holds a key byte while fastknockd serves.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest

from fastknock import fwd, server
from fastknock.conf.config import Config, load_config
from tests.e2e_support import KEY1, USER1, USER2, port_res, server_config


def _conf(tmp_path: Path) -> Path:
    path = tmp_path / "fastknockd.conf"
    path.write_text(server_config([port_res(0x22, 22)], "basic-auth"))
    path.chmod(0o600)
    return path


def _configs_with_keys(source: str) -> list[Config]:
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, Config) and o.source == source and any(o.keys.values())
    ]


def test_fastknockd_drops_config_keys_once_the_key_ring_is_built(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = _conf(tmp_path)
    args = server.build_parser().parse_args(["-c", str(conf), "--rundir", str(tmp_path),
                                             "--no-systemd"])  # fmt: skip
    args.seccomp_mode = "off"
    caplog.set_level(logging.INFO, "fastknockd")
    found: list[int] = []

    async def main() -> None:
        config = load_config(conf, "server")
        assert _configs_with_keys(str(conf)) == [config]  # control: the probe sees keys
        task = asyncio.create_task(server.serve(config, args, (None, None)))
        del config
        while "listening on port" not in caplog.text:
            if task.done():
                task.result()  # serve() failed: raise its error
            await asyncio.sleep(0.01)
        found.append(len(_configs_with_keys(str(conf))))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert found == [0]
    assert "2 users" in caplog.text  # the user ids are still known


def test_fastknockfwd_loads_the_config_without_keys(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    full = load_config(conf, "server")
    assert full.keys[USER1] == KEY1  # control
    cfg = fwd._load(str(conf))
    assert dict(cfg.keys) == {USER1: b"", USER2: b""}
    assert cfg.admit(USER1, 0x22) == full.admit(USER1, 0x22)  # what fwd checks still works
    assert cfg.checksum == full.checksum
