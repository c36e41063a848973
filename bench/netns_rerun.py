"""Run a benchmark script again inside a network namespace of its own (root only).

The kernel benchmarks (``bench_fwd_install``, ``bench_interval_sets``) load rulesets; they
do it in a fresh namespace ``fk-bench-<random>`` that this deletes afterwards, so the
host's ruleset is never touched.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys


def rerun_in_namespace(script: str, args: list[str]) -> int:
    """``python SCRIPT --inner ARGS`` inside a new namespace; its exit status."""
    name = os.path.splitext(os.path.basename(script))[0]
    if os.geteuid() != 0:
        print(f"{name} needs root (network namespace, nftables)", file=sys.stderr)
        return 1
    ns = f"fk-bench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = [sys.executable, os.path.abspath(script), "--inner", *args]
        return subprocess.run(["ip", "netns", "exec", ns, *argv]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])
