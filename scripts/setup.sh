#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for fastknock: system packages
# (nftables + libnftables, iproute2, a C compiler, Python headers and pip, libseccomp, systemd
# for systemd-socket-activate and systemd-analyze, man-db for `man -l`), the Python packages
# (requirements-dev.txt: pinned lint tools, test and packaging tools; the runtime dependencies
# of pyproject.toml), and the Cython extensions built in place (so the checkout itself is
# runnable and testable) plus an editable install for the console scripts.
#
# Works on a debootstrap minbase (no python3 at all) and on a cloud image with python3 but no
# pip. Long outputs are read into variables, never piped into `grep -q`: under pipefail the
# pipeline fails when grep exits early and the writer (ldconfig, pip) dies of SIGPIPE.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

libs=$(ldconfig -p 2>/dev/null || true)
has_lib() { [[ $libs == *"$1"* ]]; }

pkgs=()
command -v nft >/dev/null 2>&1 || pkgs+=(nftables)
has_lib libnftables.so.1 || pkgs+=(libnftables1)
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
command -v gcc >/dev/null 2>&1 || pkgs+=(gcc)
command -v make >/dev/null 2>&1 || pkgs+=(make)
has_lib libseccomp.so.2 || pkgs+=(libseccomp2)
command -v systemd-socket-activate >/dev/null 2>&1 || pkgs+=(systemd)
command -v systemd-analyze >/dev/null 2>&1 || pkgs+=(systemd)
command -v man >/dev/null 2>&1 || pkgs+=(man-db)
if ! command -v "$PY" >/dev/null 2>&1; then
    pkgs+=(python3 python3-pip python3-dev python3-venv)
else
    "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
        pkgs+=(python3-dev)
    # Debian splits pip and venv (ensurepip) out of python3; other Pythons bring ensurepip.
    if [ "$(command -v "$PY")" = /usr/bin/python3 ]; then
        "$PY" -m pip --version >/dev/null 2>&1 || pkgs+=(python3-pip)
        "$PY" -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
    fi
fi
if [ ${#pkgs[@]} -gt 0 ]; then
    # shellcheck disable=SC2207  # word splitting of a de-duplicated list of package names
    pkgs=($(printf '%s\n' "${pkgs[@]}" | sort -u))
    echo "setup: installing system packages: ${pkgs[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "setup: no pip for $PY: bootstrapping it with ensurepip"
    "$PY" -m ensurepip --upgrade >/dev/null
fi

pip=("$PY" -m pip install -q)
# Debian's own Python refuses pip installs into the system (PEP 668) unless told otherwise.
pip_help=$("$PY" -m pip install --help 2>/dev/null || true)
[[ $pip_help != *--break-system-packages* ]] || pip+=(--break-system-packages)
"${pip[@]}" -r requirements-dev.txt
# atheris drives the fuzz targets (make fuzz; CI's smoke). It installs from a manylinux wheel
# (checked on CPython 3.11); without a wheel pip compiles it, which needs clang + libFuzzer.
# Its absence only disables fuzzing, so it does not fail the set-up.
"${pip[@]}" "atheris>=2.3" || echo "setup: atheris not installed: make fuzz will not run" >&2
"$PY" setup.py -q build_ext --inplace
"${pip[@]}" --no-build-isolation -e .
echo "setup: done ($("$PY" -c 'import fastknock.wire as w, fastknock.mac as m; print("wire:", w.IMPLEMENTATION, "mac:", m.IMPLEMENTATION)'))"
