#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for fastknock: system packages
# (nftables + libnftables, iproute2, a C compiler, Python headers, libseccomp), the Python
# packages of pyproject.toml, and the Cython extensions built in place (so the checkout
# itself is runnable and testable) plus an editable install for the console scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

pkgs=()
command -v nft >/dev/null 2>&1 || pkgs+=(nftables)
ldconfig -p 2>/dev/null | grep -q 'libnftables.so.1' || pkgs+=(libnftables1)
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
command -v gcc >/dev/null 2>&1 || pkgs+=(gcc)
command -v make >/dev/null 2>&1 || pkgs+=(make)
ldconfig -p 2>/dev/null | grep -q 'libseccomp.so.2' || pkgs+=(libseccomp2)
command -v systemd-socket-activate >/dev/null 2>&1 || pkgs+=(systemd)
if ! command -v "$PY" >/dev/null 2>&1; then
    pkgs+=(python3 python3-pip python3-dev python3-venv)
elif ! "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    pkgs+=(python3-dev)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${pkgs[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

pip=("$PY" -m pip install -q --disable-pip-version-check)
# Debian's own Python refuses pip installs into the system (PEP 668) unless told otherwise.
if "$PY" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    pip+=(--break-system-packages)
fi
"${pip[@]}" "Cython>=3.0" "setuptools>=65" wheel "uvloop>=0.19" "pycryptodome>=3.18" \
    "pyseccomp>=0.1" "pytest>=7" "hypothesis>=6" "pytest-benchmark>=4" ruff mypy
"$PY" setup.py -q build_ext --inplace
"${pip[@]}" --no-build-isolation --no-deps -e .
echo "setup: done ($("$PY" -c 'import fastknock.wire as w, fastknock.mac as m; print("wire:", w.IMPLEMENTATION, "mac:", m.IMPLEMENTATION)'))"
