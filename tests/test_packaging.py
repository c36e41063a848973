"""What a user downloads: the sdist carries everything its own tests need, and they pass from
the unpacked sdist; the artefacts pass ``make dist``'s check (scripts/check_dist.py: package
data, licenses, no generated C); the wheel declares the runtime dependencies; a wheel built
without the extensions (the form the client takes where there is no compiler, or no Linux)
installs into a fresh venv with nothing else, and its ``fastknock`` knocks the real daemons.

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
    # Nothing of the caller's choice of implementation or path: each call says what it needs.
    drop = ("PYTHONPATH", "NOTIFY_SOCKET", "FASTKNOCK_NO_EXTENSIONS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore", **extra}


def _run(argv: list[str], cwd: Path, **extra: str) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{argv}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist of this checkout and a wheel without extensions built from that sdist (in
    one directory), and the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"
    name = _run([sys.executable, "-c", code], REPO, **NO_COMPILER).split()[-1]
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(out / name) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and the security backports)
            tar.extractall(unpacked, filter="data")
        else:  # pragma: no cover - our own sdist, just built
            tar.extractall(unpacked)  # noqa: S202
    source = unpacked / name.removesuffix(".tar.gz")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"]
    _run([*pip, "--no-build-isolation", "-w", str(out), "."], source, **NO_COMPILER)
    return out, source


@pytest.fixture(scope="module")
def wheel(dist: tuple[Path, Path]) -> Path:
    (found,) = dist[0].glob("fastknock-*.whl")
    return found


def _check_dist(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_dist.py"), str(directory)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_artefacts_pass_the_release_check(dist: tuple[Path, Path], tmp_path: Path) -> None:
    """scripts/check_dist.py, as ``make dist`` runs it: package data, licenses, no generated
    C, the sdist's tests and docs. Control: it refuses a directory without them."""
    proc = _check_dist(dist[0])
    assert proc.returncode == 0 and proc.stdout.count(": ok (") == 2, proc.stdout + proc.stderr
    proc = _check_dist(tmp_path)
    assert proc.returncode == 1 and "needs a wheel and an sdist" in proc.stderr


def test_sdist_tests_pass_unpacked(dist: tuple[Path, Path]) -> None:
    """The config tests read letmein's examples in tests/compat/ (exit 5: nothing collected)."""
    source = dist[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
        cwd=source, env=_env(PYTHONPATH=str(source), FASTKNOCK_NO_EXTENSIONS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout.splitlines()[-1]


def test_wheel_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    assert wheel.name.endswith("-py3-none-any.whl")  # pure: installs anywhere
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    requires = meta.get_all("Requires-Dist") or []
    runtime = sorted(r.split(">=")[0] for r in requires if "extra ==" not in r)
    assert runtime == ["pyseccomp", "uvloop"]  # seccomp = kill works after a plain install
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


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_extensions_per_platform(platform: str) -> None:
    """setup.py's extension list as another platform sees it: the Linux-only receive path
    only on Linux, and outside Linux a failed compile is not an error (the client then runs
    on the pure-Python references)."""
    code = (
        "import sys, setuptools\n"
        f"sys.platform = {platform!r}\n"
        "setuptools.setup = lambda ext_modules: print(*sorted(\n"
        "    f'{e.name}:{e.optional}' for e in ext_modules))\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))\n"
    )
    out = _run([sys.executable, "-c", code], REPO).split()
    if platform == "linux":
        assert out == ["fastknock._hmac:False", "fastknock._wire:False",
                       "fastknock.knockd._decide:False",
                       "fastknock.knockd._recv:False"]  # fmt: skip
    else:
        assert out == ["fastknock._hmac:True", "fastknock._wire:True"]
