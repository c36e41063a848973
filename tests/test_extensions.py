"""The build really produced the Cython extensions and the selectors use them.

Fails if a build that was meant to compile ``fastknock._wire`` / ``fastknock._hmac``
silently fell back to the pure-Python references. With ``FASTKNOCK_NO_EXTENSIONS=1`` the
selectors must choose the references instead.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastknock.mac
import fastknock.wire
from fastknock import _ext

NO_EXTENSIONS = _ext.disabled()


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")
@pytest.mark.parametrize("name", ["fastknock._wire", "fastknock._hmac", "fastknock.knockd._decide"])
def test_extension_is_compiled(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert module.__file__.endswith(".so")


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTKNOCK_NO_EXTENSIONS=1")
def test_selectors_use_c() -> None:
    assert fastknock.wire.IMPLEMENTATION == "c"
    assert fastknock.mac.IMPLEMENTATION == "c"
    assert fastknock.wire.parse.__module__ == "fastknock._wire"
    assert fastknock.mac.HmacKey.__module__ == "fastknock._hmac"
    assert fastknock.mac.KeyRing.__module__ == "fastknock._hmac"


@pytest.mark.skipif(not NO_EXTENSIONS, reason="only with FASTKNOCK_NO_EXTENSIONS=1")
def test_selectors_use_py_when_disabled() -> None:
    assert fastknock.wire.IMPLEMENTATION == "py"
    assert fastknock.mac.IMPLEMENTATION == "py"
    assert fastknock.wire.parse.__module__ == "fastknock._wire_py"
    assert fastknock.mac.HmacKey.__module__ == "fastknock._hmac_py"


def test_env_switch_selects_py_in_a_fresh_interpreter() -> None:
    code = (
        "import fastknock.wire as w, fastknock.mac as m; "
        "print(w.IMPLEMENTATION, m.IMPLEMENTATION, w.parse.__module__, m.HmacKey.__module__)"
    )
    env = {**os.environ, "FASTKNOCK_NO_EXTENSIONS": "1"}
    root = Path(fastknock.wire.__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["py", "py", "fastknock._wire_py", "fastknock._hmac_py"]
