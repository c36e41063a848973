"""The layering guards: what each process may import, checked on a fresh interpreter.

* fastknockfwd (root) never imports the network-facing code: its import closure holds no
  ``fastknock.server``, ``fastknock.cli``, nothing under ``fastknock.knockd`` or
  ``fastknock.knock``, no ``fastknock.protocol``, no wire/MAC codec (``wire``, ``mac``,
  ``_wire*``, ``_hmac*``) and no uvloop.
* The protocol core (``protocol``, ``wire``, ``mac``, ``message``) does no I/O: its closure
  holds no socket, asyncio, selectors, subprocess or threading. It runs with ``-S`` (no
  ``site``): the interpreter then starts with only its bootstrap modules (an editable
  install's finder would otherwise preload ``threading``), and the core must not need
  anything outside the standard library.

Each runs with the C extensions and with ``FASTKNOCK_NO_EXTENSIONS=1``. The control in each
test: the same probe on a module that does import the forbidden names finds them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock import _ext

ROOT = Path(__file__).resolve().parent.parent

FWD_FORBIDDEN_MODULES = {
    "fastknock.server",
    "fastknock.cli",
    "fastknock.protocol",
    "fastknock.wire",
    "fastknock.mac",
    "fastknock._wire",
    "fastknock._wire_py",
    "fastknock._hmac",
    "fastknock._hmac_py",
    "uvloop",
}
FWD_FORBIDDEN_PACKAGES = ("fastknock.knockd", "fastknock.knock", "uvloop")
CORE = ("fastknock.protocol", "fastknock.wire", "fastknock.mac", "fastknock.message")
IO_MODULES = ("socket", "asyncio", "selectors", "subprocess", "threading")


def closure(modules: tuple[str, ...], no_extensions: bool, *flags: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules``."""
    env = {k: v for k, v in os.environ.items() if k != "FASTKNOCK_NO_EXTENSIONS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if no_extensions:
        env["FASTKNOCK_NO_EXTENSIONS"] = "1"
    code = f"import sys, {', '.join(modules)}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, *flags, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def fwd_violations(loaded: set[str]) -> set[str]:
    return {
        m
        for m in loaded
        if m in FWD_FORBIDDEN_MODULES
        or any(m == p or m.startswith(p + ".") for p in FWD_FORBIDDEN_PACKAGES)
    }


def io_violations(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in IO_MODULES or m == "_socket"}


@pytest.mark.parametrize("no_extensions", [False, True], ids=["c", "py"])
def test_fwd_closure_holds_no_network_facing_code(no_extensions: bool) -> None:
    loaded = closure(("fastknock.fwd",), no_extensions)
    assert "fastknock.firewall.daemon" in loaded and "fastknock.ipc" in loaded
    assert fwd_violations(loaded) == set()
    # Control: the probe sees these imports where they happen (fastknockd's main).
    server = fwd_violations(closure(("fastknock.server",), no_extensions))
    assert {"fastknock.protocol", "fastknock.knockd.control", "fastknock.mac"} <= server


@pytest.mark.parametrize("no_extensions", [False, True], ids=["c", "py"])
def test_protocol_core_closure_does_no_io(no_extensions: bool) -> None:
    loaded = closure(CORE, no_extensions, "-S")
    assert set(CORE) <= loaded
    if no_extensions:
        assert "fastknock._wire_py" in loaded and "fastknock._wire" not in loaded
    elif not _ext.disabled():  # as tests/test_extensions.py: a build must not fall back
        assert "fastknock._wire" in loaded and "fastknock._hmac" in loaded
    assert io_violations(loaded) == set()
    # Control: the probe sees I/O modules where they are imported (fastknockd's fwd link).
    link = closure(("fastknock.knockd.fwdlink",), no_extensions, "-S")
    assert {"asyncio", "socket", "selectors"} <= io_violations(link)
