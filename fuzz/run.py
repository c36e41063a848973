"""Run the fuzz targets one after the other and print what each did.

Usage: ``python3 fuzz/run.py [--seconds N] [--seed | --merge] [TARGET...]`` (``make fuzz``;
the default is every target for ``FUZZ_SECONDS`` seconds, 60 unless set). Exit status 1 if
any target crashed, found a difference or a violation, or did not run.

Design
------
* One process per target (``fuzz/fuzz_<target>.py``, atheris/libFuzzer), run for
  ``-max_total_time``; the targets' invariants are in their own docstrings and the shared
  bookkeeping in ``harness.py``.
* Everything a run writes goes under ``build/fuzz/<target>/`` (git ignores ``build/``):
  libFuzzer's growing corpus (the first corpus directory, the only one it writes to; kept
  between runs), its crash/timeout/oom artifacts, the target's ``found/`` inputs and
  counters, and the log. The checked-in seeds (``fuzz/corpus/<target>``, and
  ``tests/compat`` for the config target) are only read.
* Executions come from libFuzzer's final statistics; crashes are the target's own count
  (an exception the invariant forbids) plus libFuzzer's artifacts (a timeout, running out
  of memory, a crash in C); differences and violations are the target's counts.
* ``--seed`` rewrites ``fuzz/corpus/<target>`` from each target's ``seeds()`` instead;
  ``--merge`` adds to it the inputs of the grown corpus (``build/fuzz/<target>/corpus``)
  that reach coverage the checked-in ones do not (libFuzzer's ``-merge=1``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import read_counts  # noqa: E402

TARGETS = ("wire", "config", "ipc", "recv")
EXTRA_SEEDS = {"config": [os.path.join(ROOT, "tests", "compat")]}
UNITS = {"recv": "recvmmsg batches read by the C reader"}  # what harness.add_units counts
ARTIFACT = re.compile(r"^(crash|timeout|oom|leak|slow-unit)-")
GRACE = 120  # seconds beyond -max_total_time for start-up and loading the corpus


def env_for(workdir: str) -> dict[str, str]:
    env = dict(os.environ, FUZZ_WORKDIR=workdir)
    env.pop("FASTKNOCK_NO_EXTENSIONS", None)  # the differential needs the C extensions
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return env


def run_target(name: str, seconds: int) -> dict[str, object]:
    workdir = os.path.join(ROOT, "build", "fuzz", name)
    corpus = os.path.join(workdir, "corpus")
    for stale in ("found", "artifacts"):
        shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(os.path.join(workdir, "artifacts"))
    seeds = [os.path.join(HERE, "corpus", name), *EXTRA_SEEDS.get(name, [])]
    cmd = [
        sys.executable,
        os.path.join(HERE, f"fuzz_{name}.py"),
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        "-timeout=30",
        f"-artifact_prefix={os.path.join(workdir, 'artifacts')}/",
        corpus,
        *seeds,
    ]
    log_path = os.path.join(workdir, "log.txt")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env_for(workdir),
                timeout=seconds + GRACE, check=False,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = -1
    elapsed = time.monotonic() - started
    with open(log_path, errors="replace") as f:
        text = f.read()
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    counts = read_counts(workdir)
    artifacts = [a for a in os.listdir(os.path.join(workdir, "artifacts")) if ARTIFACT.match(a)]
    found_dir = os.path.join(workdir, "found")
    found = []
    if os.path.isdir(found_dir):
        for entry in sorted(os.listdir(found_dir)):
            if entry.endswith(".txt"):
                with open(os.path.join(found_dir, entry)) as f:
                    found.append(f"{f.readline().strip()}  [{os.path.join(found_dir, entry[:-4])}]")
    found += [f"libFuzzer {a}  [{os.path.join(workdir, 'artifacts', a)}]" for a in artifacts]
    return {
        "target": name,
        "seconds": elapsed,
        "executions": int(runs.group(1)) if runs else None,
        "crashes": counts["crash"] + len(artifacts),
        "differences": counts["difference"],
        "violations": counts["violation"],
        "units": counts["units"],
        "found": found,
        "ok": rc == 0 and runs is not None,
        "log": log_path,
    }


def report(results: list[dict[str, object]]) -> None:
    head = f"{'target':<8} {'seconds':>7} {'executions':>12} {'exec/s':>8} "
    print(head + f"{'crashes':>8} {'differences':>11} {'violations':>10}")
    for r in results:
        runs = r["executions"]
        rate = f"{runs / r['seconds']:.0f}" if runs is not None else "-"  # type: ignore[operator]
        print(
            f"{r['target']:<8} {r['seconds']:>7.0f} {runs if runs is not None else '-':>12} "
            f"{rate:>8} {r['crashes']:>8} {r['differences']:>11} {r['violations']:>10}"
        )
    for r in results:
        if r["target"] in UNITS:
            print(f"  {r['target']}: {r['units']} {UNITS[r['target']]}")  # type: ignore[index]
        for line in r["found"]:  # type: ignore[attr-defined]
            print(f"  {r['target']}: {line}")
        if not r["ok"]:
            print(f"  {r['target']}: did not finish normally, see {r['log']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--seed", action="store_true", help="rewrite fuzz/corpus/<target>")
    parser.add_argument("--merge", action="store_true", help="grow fuzz/corpus/<target>")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=" ".join(TARGETS))
    args = parser.parse_args()
    targets = args.targets or list(TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {' '.join(sorted(unknown))}")
    if args.seed or args.merge:
        for name in targets:
            script = os.path.join(HERE, f"fuzz_{name}.py")
            out = os.path.join(HERE, "corpus", name)
            grown = os.path.join(ROOT, "build", "fuzz", name, "corpus")
            cmd = [sys.executable, script, "--seed", out]
            if args.merge:
                cmd = [sys.executable, script, "-merge=1", out, grown]
            workdir = os.path.join(ROOT, "build", "fuzz", name, "merge")
            subprocess.run(cmd, env=env_for(workdir), check=True)
        return 0
    results = []
    for name in targets:
        print(f"fuzz: {name} for {args.seconds} s ...", flush=True)
        results.append(run_target(name, args.seconds))
    report(results)
    bad = any(r["crashes"] or r["differences"] or r["violations"] or not r["ok"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
