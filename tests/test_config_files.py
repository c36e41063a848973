"""Hostile config files: only a regular file is read, at most 1 MiB, parsed in linear time.

The linear-time tests use inputs where the old quadratic parser needed minutes (measured
before the fix: items on 40 000 continuation lines took 34 s, 200 000 continuation lines
4.7 s, growing 4x per doubling), while the linear one takes about a second. There is no
wall-clock threshold: a quadratic parser simply does not finish these in a test run.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock.conf.config import load_config, parse_config
from fastknock.conf.files import MAX_CONFIG_BYTES
from fastknock.conf.lexer import lex
from fastknock.errors import ConfigError
from tests.e2e_support import REPO, _env, port_res, server_config

GOOD = server_config([port_res(0x22, 22)], "basic-auth")


def test_items_on_continuation_lines_are_linear() -> None:
    """200 000 ``/`` items, one per continuation line, under the 1 MiB limit: the old
    parser looked up each item's line by a scan of all continuation lines (quadratic:
    about 14 minutes for this input)."""
    text = "[GENERAL]\nport = 5800" + "\n /" * 200_000
    assert len(text.encode()) < MAX_CONFIG_BYTES
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.conf", "server")
    assert info.value.line == 3  # the first empty item, on its own line: lines still right
    assert "empty item" in info.value.message


def test_continuation_lines_are_linear() -> None:
    """One option continued over 1 000 000 lines (lexed directly: the size limit is the
    loader's business): the old lexer grew one string per line (about two minutes)."""
    sections = lex("[A]\nx = 1" + "\n xy" * 1_000_000, "t.conf")
    opt = sections["A"].options["x"]
    assert opt.value == " 1" + " xy" * 1_000_000
    assert opt.line_at(len(opt.value) - 1) == 1_000_002  # the last continuation line


def test_many_comma_values_are_linear() -> None:
    text = GOOD.replace("port: 22", "port: 22 / users: 1" + ", 1" * 150_000)
    cfg = parse_config(text, "t.conf", "server")
    assert cfg.resources[0x22].users == frozenset({1})


def test_size_limit(tmp_path: Path) -> None:
    """A file over 1 MiB is refused with file and line; one just under it is read."""
    path = tmp_path / "big.conf"
    filler = "# " + "x" * 77 + "\n"
    body = GOOD + filler * ((MAX_CONFIG_BYTES - len(GOOD)) // len(filler))
    path.write_text(body)
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    assert load_config(path, "server").resources  # control: under the limit loads
    path.write_text(body + filler * 2)
    with pytest.raises(ConfigError) as info:
        load_config(path, "server")
    assert "larger than 1 MiB" in info.value.message
    assert info.value.source == str(path) and info.value.line is not None
    assert str(info.value).startswith(f"{path}:{info.value.line}: ")
    with pytest.raises(ConfigError):  # the same limit for text handed to the parser
        parse_config(body + filler * 2, "t.conf", "server")


def _limit_memory() -> None:  # in the child: an unbounded read fails fast, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    # ``timeout`` bounds a hang (the FIFO case blocked forever before): not a measurement.
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=_env(), cwd=str(REPO),
        timeout=60, preexec_fn=_limit_memory,
    )  # fmt: skip


@pytest.mark.parametrize("prog", ["fastknock.server", "fastknock.fwd"])
def test_dev_zero_and_fifo_are_clear_errors(tmp_path: Path, prog: str) -> None:
    """``-c /dev/zero`` (was: MemoryError) and ``-c FIFO`` (was: blocked forever): a clear
    one-line error naming the file, exit 2; a regular file passes the same check."""
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)
    extra = ["--check-config"] if prog == "fastknock.server" else ["--list"]
    for path, kind in (("/dev/zero", "character device"), (str(fifo), "FIFO")):
        proc = _run("-m", prog, "-c", path, *extra)
        assert proc.returncode == 2, proc.stderr
        assert f"{path}: cannot read config: a {kind}, not a regular file" in proc.stderr
        assert "Traceback" not in proc.stderr
    if prog == "fastknock.server":  # control: a regular file gets past the check
        good = tmp_path / "good.conf"
        good.write_text(GOOD)
        good.chmod(0o600)
        proc = _run("-m", prog, "-c", str(good), "--check-config")
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
