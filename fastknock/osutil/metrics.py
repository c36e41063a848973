"""Counters in Prometheus text format, written to a file for node_exporter's textfile collector.

Design
------
* No listening socket: the daemons write ``--metrics-file`` (e.g.
  ``/var/lib/prometheus/node-exporter/fastknockd.prom``) every ``--metrics-interval``
  seconds and once more at exit. Each write goes to a temporary file in the same directory
  and is renamed over the target, so the collector never reads half a file.
* ``render`` produces the text exposition format 0.0.4: ``# HELP`` and ``# TYPE`` per
  family, then ``name{label="value"} number`` lines. Label values are escaped
  (backslash, double quote, newline); names are checked against the format's grammar.
* The daemons' counters map onto stable metric families: fastknockd's in
  ``knockd/counters.py`` (an enum: every counter has its family, nothing unmapped),
  fastknockfwd's in ``fwd_families`` here. Every known series is written from the start
  (zero until something happens), so rates work without gaps.
* ``MetricsWriter`` is the periodic asyncio task; a failing write is logged (once per
  distinct error) and retried at the next interval, never fatal.
* With ``fastknockd --workers N`` each worker writes its own file (``worker_path``) with a
  ``worker`` label, so the collector (which merges the files of its directory) sees
  distinct series.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Family",
    "MetricsWriter",
    "Sample",
    "fwd_families",
    "render",
    "worker_path",
    "write_atomic",
]

log = logging.getLogger("fastknock.metrics")

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = ("counter", "gauge", "untyped")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    value: float
    labels: Labels = ()


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    type: str
    help: str
    samples: Sequence[Sample] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"bad metric name {self.name!r}")
        if self.type not in _TYPES:
            raise ValueError(f"bad metric type {self.type!r}")
        for sample in self.samples:
            for key, _ in sample.labels:
                if not _LABEL.match(key) or key.startswith("__"):
                    raise ValueError(f"bad label name {key!r}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family], extra_labels: Labels = ()) -> str:
    """The text exposition format; ``extra_labels`` go on every sample (e.g. worker)."""
    lines: list[str] = []
    seen: set[str] = set()
    for fam in families:
        if fam.name in seen:
            raise ValueError(f"metric family {fam.name!r} twice")
        seen.add(fam.name)
        lines.append(f"# HELP {fam.name} {fam.help.replace(chr(92), chr(92) * 2)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for sample in fam.samples:
            labels = (*extra_labels, *sample.labels)
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{{{text}}} {_number(sample.value)}" if text else
                         f"{fam.name} {_number(sample.value)}")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastknock-metrics-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)  # fchmod: in the seccomp allow-lists' "files" group
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def worker_path(path: str, worker: int, workers: int) -> str:
    """``fastknockd.prom`` for one worker; ``fastknockd.worker2.prom`` for worker 2 of N."""
    if workers <= 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.worker{worker}{ext or '.prom'}"


# -- fastknockfwd ------------------------------------------------------------------------------

_FWD_COUNTERS = {
    "requests": ("fastknockfwd_requests_total", "Lease requests from fastknockd."),
    "acks": ("fastknockfwd_acks_total", "Requests answered ACK."),
    "nacks": ("fastknockfwd_nacks_total", "Requests refused or failed (any non-ACK reply)."),
    "batches": ("fastknockfwd_batches_total", "Request batches planned and applied."),
    "transactions": ("fastknockfwd_transactions_total", "nftables transactions run for lease "
                     "changes."),
    "failed_transactions": ("fastknockfwd_failed_transactions_total", "nftables "
                            "transactions that failed."),
    "changes": ("fastknockfwd_lease_changes_total", "Lease changes submitted to nftables."),
    "fallbacks": ("fastknockfwd_batch_fallbacks_total", "Failed batches re-applied one "
                  "change at a time."),
    "refused_peers": ("fastknockfwd_refused_peers_total", "Connections refused by the "
                      "SO_PEERCRED check."),
}  # fmt: skip


def fwd_families(
    stats: Mapping[str, int],
    prefilter: Mapping[str, int] | None = None,
    hooks: Mapping[str, int] | None = None,
) -> list[Family]:
    """fastknockfwd's metric families from ``Daemon.stats`` (plus its ``counts``), the
    pre-filter's kernel counters (``firewall.prefilter.COUNTERS`` names; None: no
    pre-filter, no such families) and the hooks' (``HookLeases.metric_stats``; None: no
    [HOOKS])."""
    fams = [
        Family(name, "counter", text, [Sample(stats.get(key, 0))])
        for key, (name, text) in _FWD_COUNTERS.items()
    ]
    for name, key, text in (
        ("fastknockfwd_leases", "live",
         "Live leases (port set elements and jump rules) the daemon knows of."),
        ("fastknockfwd_wide_leases", "wide",
         "Live port leases that are a prefix or a port range (interval sets)."),
        ("fastknockfwd_lease_holders", "holders",
         "Knockers (user, address) holding a live lease: what max-nr-rules counts."),
    ):  # fmt: skip
        fams.append(Family(name, "gauge", text, [Sample(stats.get(key, 0))]))
    if prefilter is not None:
        fams += _prefilter_families(prefilter)
    if hooks is not None:
        fams += _hook_families(hooks)
    statuses = sorted(k for k in stats if k.startswith("status_"))
    if statuses:
        fams.append(
            Family(
                "fastknockfwd_replies_total",
                "counter",
                "Replies sent to fastknockd, by status.",
                [Sample(stats[k], (("status", k[len("status_") :]),)) for k in statuses],
            )
        )
    return fams


def _prefilter_families(counts: Mapping[str, int]) -> list[Family]:
    """From the kernel's counters as read (all of them exist from the pre-filter's set-up
    on, so every series is there from the start): ``dropped_<reason>``, ``spared_<reason>``,
    ``proven``."""

    def by_reason(kind: str) -> list[Sample]:
        keys = sorted(k for k in counts if k.startswith(f"{kind}_"))
        return [Sample(counts[k], (("reason", k[len(kind) + 1 :]),)) for k in keys]

    return [
        Family("fastknockfwd_prefilter_dropped_total", "counter", "Datagrams the in-kernel "
               "pre-filter dropped: wrong size, or over a source's allowance (reason ip4: "
               "address, ip6: IPv6 prefix, ip6group: IPv6 group) and over the spare.",
               by_reason("dropped")),
        Family("fastknockfwd_prefilter_spared_total", "counter", "Datagrams over a source's "
               "allowance that the pre-filter's spare allowance let through.",
               by_reason("spared")),
        Family("fastknockfwd_prefilter_proven_total", "counter", "Datagrams from proven "
               "sources (a recent lease) that passed before the buckets.",
               [Sample(counts.get("proven", 0))]),
    ]  # fmt: skip


def _hook_families(h: Mapping[str, int]) -> list[Family]:
    """[HOOKS]: the events fastknockfwd passed on, and what the hook runner reported."""
    return [
        Family("fastknockfwd_hook_events_total", "counter", "Hook events passed to the hook "
               "runner, by event.", [Sample(h["hook_opens"], (("event", "open"),)),
                                     Sample(h["hook_closes"], (("event", "close"),))]),
        Family("fastknockfwd_hook_events_dropped_total", "counter", "Hook events dropped: "
               "queue full (where: daemon, runner) or knock-lease table full (untracked).",
               [Sample(h["hook_dropped_daemon"], (("where", "daemon"),)),
                Sample(h["hook_dropped_runner"], (("where", "runner"),)),
                Sample(h["hook_untracked"], (("where", "untracked"),))]),
        Family("fastknockfwd_hook_runs_total", "counter", "Hook programs the runner ran, by "
               "result (ok: exit 0; failed: other exit, signal, or could not start; timeout: "
               "killed after hook-timeout), as it reported them.",
               [Sample(h["hook_ok"], (("result", "ok"),)),
                Sample(h["hook_failed"], (("result", "failed"),)),
                Sample(h["hook_timed_out"], (("result", "timeout"),))]),
        Family("fastknockfwd_hook_runs_started_total", "counter", "Hook programs the runner "
               "started, as it reported them.", [Sample(h["hook_started"])]),
        Family("fastknockfwd_hook_bad_reports_total", "counter", "Reads from the hook runner "
               "that were not whole valid reports (ignored).", [Sample(h["hook_bad_reports"])]),
        Family("fastknockfwd_hook_leases", "gauge", "Open knock-leases the hooks track for "
               "on-close.", [Sample(h["hook_leases"])]),
        Family("fastknockfwd_hook_runner_up", "gauge", "1 while the hook runner is alive.",
               [Sample(h["hook_runner_up"])]),
    ]  # fmt: skip


# -- the periodic writer -----------------------------------------------------------------------


class MetricsWriter:
    """Writes ``collect()`` to ``path`` every ``interval`` seconds (asyncio task)."""

    def __init__(
        self,
        path: str,
        collect: Callable[[], Iterable[Family]],
        interval: float = 15.0,
        extra_labels: Labels = (),
    ) -> None:
        if interval <= 0:
            raise ValueError("metrics interval must be positive")
        self.path = path
        self.collect = collect
        self.interval = interval
        self.extra_labels = extra_labels
        self.writes = 0
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def write(self) -> bool:
        """One write now; False (logged) if it failed."""
        try:
            write_atomic(self.path, render(self.collect(), self.extra_labels))
        except (OSError, ValueError) as exc:
            msg = f"cannot write metrics to {self.path}: {exc}"
            if msg != self._last_error:
                log.warning("%s", msg)
                self._last_error = msg
            return False
        self._last_error = None
        self.writes += 1
        return True

    async def _run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the task and write the final values."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.write()
