"""What every fuzz target shares: outcome capture, failure bookkeeping, the atheris entry.

Design
------
* A target is ``one(data: bytes) -> None`` that raises ``Difference`` when the C extension
  and its pure-Python reference disagree, ``Violation`` when another invariant of the
  target breaks (a round trip, a property of an error message), and lets any other
  exception escape: that is a crash (the "never another exception" part of the invariant).
* The harness catches all three and keeps going (libFuzzer would stop at the first one), so
  that a run reports how often each kind happened. Each distinct failure is kept once under
  ``<workdir>/found/<kind>-<signature hash>`` (the input) with a ``.txt`` beside it (what
  went wrong). A crash's signature is its exception type and innermost frame; the targets
  name their differences and violations themselves (which call, which invariant).
* The counters live in a small file mapped into memory: libFuzzer ends the process with
  ``exit()`` when its time is up, without running Python's ``atexit`` handlers, and pages
  of a shared mapping survive that. ``fuzz/run.py`` reads them and libFuzzer's own final
  statistics (executions) after each target.
* Targets import fastknock inside ``atheris.instrument_imports()`` so that libFuzzer sees
  Python-level coverage of the code under test. The Cython extensions are not instrumented
  (that needs a clang ``-fsanitize=fuzzer-no-link`` build); the differential against the
  instrumented references is what steers inputs through their branches.
* ``--replay FILE...`` runs inputs once, without libFuzzer, and prints each outcome (to
  turn a finding into a unit test). ``--seed DIR`` writes the target's seed inputs there
  (``fuzz/corpus/<target>``): each target builds its seeds itself, since it owns its input
  layout. Files are named by the SHA-1 of their content, as libFuzzer names its own.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

KINDS = ("crash", "difference", "violation")
FIELDS = (*KINDS, "units")  # units: what a target counts besides executions (add_units)
_COUNTS = struct.Struct("<4Q")
_recorder: Recorder | None = None


class Difference(Exception):
    """The C extension and the pure-Python reference disagree. ``signature`` names what."""

    def __init__(self, signature: str, detail: str = "") -> None:
        super().__init__(f"{signature}: {detail}" if detail else signature)
        self.signature = signature


class Violation(Exception):
    """An invariant other than "no other exception" broke. ``signature`` names which."""

    def __init__(self, signature: str, detail: str = "") -> None:
        super().__init__(f"{signature}: {detail}" if detail else signature)
        self.signature = signature


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("raise", exception type)``: what the differential compares."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the caller decides which types are allowed
        return ("raise", type(exc))


def same(what: str, c: object, py: object) -> None:
    """Raise ``Difference`` unless the two outcomes (or plain values) are equal. The
    signature names the call and, for outcomes, what each side did."""
    if c != py:
        raise Difference(f"{what}: C {_did(c)} vs Python {_did(py)}", f"{short(c)} vs {short(py)}")


def _did(result: object) -> str:
    if isinstance(result, tuple) and len(result) == 2 and result[0] == "raise":
        return f"raised {result[1].__name__}"
    return "returned"


def short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _crash_signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


class Recorder:
    """Counts failures by kind and keeps one input per distinct failure."""

    def __init__(self, workdir: str) -> None:
        self.found = os.path.join(workdir, "found")
        os.makedirs(self.found, exist_ok=True)
        path = os.path.join(workdir, "counts.bin")
        with open(path, "wb") as f:
            f.write(bytes(_COUNTS.size))
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _COUNTS.size)
        self._seen: set[str] = set()

    def run(self, one: Callable[[bytes], None], data: bytes) -> None:
        try:
            one(data)
        except Difference as exc:
            self.record("difference", exc.signature, str(exc), data)
        except Violation as exc:
            self.record("violation", exc.signature, str(exc), data)
        except Exception as exc:  # the invariant says this never happens: a crash
            detail = "".join(traceback.format_exception(exc))
            self.record("crash", _crash_signature(exc), detail, data)

    def add(self, field: str, n: int) -> None:
        counts = list(_COUNTS.unpack_from(self._map))
        counts[FIELDS.index(field)] += n
        _COUNTS.pack_into(self._map, 0, *counts)

    def record(self, kind: str, signature: str, detail: str, data: bytes) -> None:
        self.add(kind, 1)
        name = f"{kind}-{hashlib.sha1(signature.encode(), usedforsecurity=False).hexdigest()[:12]}"
        if name in self._seen:
            return
        self._seen.add(name)
        path = os.path.join(self.found, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            with open(path + ".txt", "w") as f:
                f.write(f"{kind}: {signature}\n\n{detail}\n")


def read_counts(workdir: str) -> dict[str, int]:
    """The counters a target's run left in ``workdir`` (zeros if it never started)."""
    try:
        with open(os.path.join(workdir, "counts.bin"), "rb") as f:
            raw = f.read(_COUNTS.size)
    except OSError:
        raw = b""
    values = _COUNTS.unpack(raw) if len(raw) == _COUNTS.size else (0,) * len(FIELDS)
    return dict(zip(FIELDS, values, strict=True))


def add_units(n: int) -> None:
    """Count ``n`` units of work (e.g. the recv target's reader batches) in this run."""
    if _recorder is not None:
        _recorder.add("units", n)


def write_seeds(directory: str, seeds: Iterable[bytes]) -> int:
    """Replace the files of ``directory`` with ``seeds``; returns how many were written."""
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):
        os.unlink(os.path.join(directory, old))
    names = set()
    for data in seeds:
        name = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        names.add(name)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return len(names)


def main(name: str, one: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """Run target ``name``: ``--seed DIR``, ``--replay FILE...`` or libFuzzer's command
    line."""
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        print(f"{name}: {write_seeds(sys.argv[2], seeds())} seeds in {sys.argv[2]}")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        for path in sys.argv[2:]:
            with open(path, "rb") as f:
                data = f.read()
            try:
                one(data)
            except Exception as exc:
                print(f"{path}: {type(exc).__name__}: {exc}")
            else:
                print(f"{path}: ok")
        return
    import atheris

    workdir = os.environ.get("FUZZ_WORKDIR") or os.path.join("build", "fuzz", name)
    global _recorder
    recorder = _recorder = Recorder(workdir)
    atheris.Setup(sys.argv, lambda data: recorder.run(one, data))
    atheris.Fuzz()
