"""Check the release artefacts in DIST (``make dist``): the wheel carries the package data
(stubs, py.typed, units, man pages) and both licenses but no Cython-generated C; the sdist
carries what its tests need (tests/ with its helpers and tests/compat/, docs, bench, the
Makefile, the set-up script) and no build output. Prints one line per artefact."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL_NEEDS = [
    "fastknock/py.typed",
    "fastknock/_wire.pyi",
    "fastknock/units/fastknockd.service",
    "fastknock/man/fastknockd.8",
    "fastknock/man/fastknock.conf.5",
]
SDIST_NEEDS = [
    "tests/netns.py",
    "tests/e2e_support.py",
    "tests/e2e_peers.py",
    "tests/compat/nftables.conf",
    "fastknock/keccak4.h",
    "docs/PROTOCOL.md",
    "bench/flood/floodgen.c",
    "Makefile",
    "scripts/setup.sh",
    "requirements-dev.txt",
    "LICENSE-MIT",
    "LICENSE-APACHE",
]


def check_wheel(path: Path) -> list[str]:
    names = set(zipfile.ZipFile(path).namelist())
    errors = [f"{path.name}: lacks {n}" for n in WHEEL_NEEDS if n not in names]
    errors += [f"{path.name}: ships generated {n}" for n in sorted(names) if n.endswith(".c")]
    licenses = {n.rsplit("/", 1)[-1] for n in names if ".dist-info/licenses/" in n}
    if licenses != {"LICENSE-MIT", "LICENSE-APACHE"}:
        errors.append(f"{path.name}: licenses {sorted(licenses)}")
    return errors


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    errors = [f"{path.name}: lacks {n}" for n in SDIST_NEEDS if n not in names]
    built = [n for n in names if n.startswith("fastknock/") and n.endswith((".c", ".so"))]
    return errors + [f"{path.name}: ships build output {n}" for n in sorted(built)]


def main(dist: str) -> int:
    files = sorted(Path(dist).iterdir())
    wheels = [f for f in files if f.suffix == ".whl"]
    sdists = [f for f in files if f.name.endswith(".tar.gz")]
    errors = [] if wheels and sdists else [f"{dist}: needs a wheel and an sdist"]
    for f in wheels + sdists:
        found = check_wheel(f) if f in wheels else check_sdist(f)
        errors += found
        print(f"check_dist: {f.name}: {'ok' if not found else 'FAILED'} ({f.stat().st_size} bytes)")
    for e in errors:
        print(f"check_dist: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
