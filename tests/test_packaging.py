"""What a user downloads: the sdist carries everything its own tests need and they pass from
the unpacked sdist; the wheel holds the package data and licenses but no generated C, and
declares the runtime dependencies; a wheel built without the extensions (the form the client
takes where no compiler or no Linux is) installs into a fresh venv with nothing else and its
``fastknock`` knocks the real daemons.

Everything is built offline, from this checkout, with the setuptools already installed
(``--no-build-isolation``); ``CC=false`` makes any attempt to compile fail loudly.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.e2e_support import REPO, Stack, port_res

NO_COMPILER = {"FASTKNOCK_NO_EXTENSIONS": "1", "CC": "false", "CXX": "false"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore", **extra}


def _run(argv: list[str], cwd: Path, **extra: str) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{argv}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of this checkout, unpacked."""
    out = tmp_path_factory.mktemp("sdist")
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"
    name = _run([sys.executable, "-c", code], REPO, **NO_COMPILER).split()[-1]
    with tarfile.open(out / name) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and the security backports)
            tar.extractall(out, filter="data")
        else:  # pragma: no cover - our own sdist, just built
            tar.extractall(out)  # noqa: S202
    return out / name.removesuffix(".tar.gz")


@pytest.fixture(scope="module")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel without extensions, built from the unpacked sdist."""
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"]
    _run([*pip, "--no-build-isolation", "-w", str(out), "."], sdist, **NO_COMPILER)
    (found,) = out.glob("fastknock-*.whl")
    return found


def test_sdist_carries_its_tests_and_they_pass(sdist: Path) -> None:
    files = {str(p.relative_to(sdist)) for p in sdist.rglob("*") if p.is_file()}
    for needed in ("tests/netns.py", "tests/e2e_support.py", "tests/compat/nftables.conf",
                   "tests/compat/letmeind.conf", "docs/PROTOCOL.md", "Makefile",
                   "scripts/setup.sh", "requirements-dev.txt", "bench/flood/floodgen.c",
                   "LICENSE-MIT", "LICENSE-APACHE", "fastknock/man/fastknockd.8"):  # fmt: skip
        assert needed in files, needed
    assert not [f for f in files if f.startswith("fastknock/") and f.endswith((".c", ".so"))]
    # The config tests read letmein's examples in tests/compat/ (exit 5: nothing collected).
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
        cwd=sdist, env=_env(PYTHONPATH=str(sdist), FASTKNOCK_NO_EXTENSIONS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout.splitlines()[-1]


def test_wheel_contents_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    assert wheel.name.endswith("-py3-none-any.whl")  # pure: installs anywhere
    for needed in ("fastknock/py.typed", "fastknock/units/fastknockd.service",
                   "fastknock/man/fastknock.1", "fastknock/man/fastknock.conf.5"):  # fmt: skip
        assert needed in names, needed
    assert not [n for n in names if n.endswith(".c")]
    assert {n.rsplit("/", 1)[-1] for n in names if "/licenses/" in n} == {
        "LICENSE-MIT",
        "LICENSE-APACHE",
    }
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    requires = meta.get_all("Requires-Dist") or []
    runtime = sorted(r.split(">=")[0] for r in requires if "extra ==" not in r)
    assert runtime == ["pyseccomp", "uvloop"]
    assert all('sys_platform == "linux"' in r for r in requires if "extra ==" not in r)


@pytest.fixture
def venv(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv with the wheel and nothing else (no index, no dependencies)."""
    root = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], tmp_path)
    pip = [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install"]
    _run([*pip, "-q", "--no-index", "--no-deps", str(wheel)], tmp_path, **NO_COMPILER)
    return root


@pytest.fixture
def stack() -> Iterator[Stack]:
    netns.require()
    s = Stack("wheel", [port_res(0x701, 2701)])
    try:
        yield s
    finally:
        s.close()


@pytest.mark.e2e
def test_wheel_client_knocks_from_a_fresh_venv(venv: Path, stack: Stack) -> None:
    """The installed ``fastknock`` (its own copy, pure Python) opens a port on the real
    daemons; before the knock the port is closed (the control)."""
    code = "import fastknock, fastknock.wire as w; print(fastknock.__file__, w.IMPLEMENTATION)"
    where = _run([str(venv / "bin" / "python"), "-c", code], venv)
    path, impl = where.split()
    assert Path(path).is_relative_to(venv) and impl == "py"
    server, me, _ = stack.addrs(False)
    assert not stack.connects(me, server, 2701)
    argv = [str(venv / "bin" / "fastknock"), "-c", str(stack.client_conf), "knock", server,
            "2701", "-4"]  # fmt: skip
    proc = netns.run(stack.ns, argv, env=_env(), cwd=str(venv), timeout=60)
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    assert stack.connects(me, server, 2701)
