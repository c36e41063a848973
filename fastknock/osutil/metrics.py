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
* ``server_families`` / ``fwd_families`` map the daemons' ``Counter``s onto stable metric
  families. Every known series is written from the start (zero until something happens),
  so rates work without gaps; an unmapped counter key still shows up, under
  ``fastknockd_other_total{counter="..."}``, rather than vanishing.
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
    "server_families",
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


# -- fastknockd --------------------------------------------------------------------------------

# Reject reasons: Controller.counters key -> label value.
_REJECTS = {
    "outcome_size": "size",
    "outcome_magic": "magic",
    "outcome_operation": "operation",
    "outcome_unknown-user": "unknown-user",
    "outcome_mac": "mac",
    "outcome_unknown-resource": "unknown-resource",
    "outcome_user-not-allowed": "user-not-allowed",
    "outcome_bad-port": "bad-port",
    "outcome_sequence": "sequence",
    "outcome_response-mac": "response-mac",
    "outcome_firewall": "firewall",
    "outcome_timeout": "timeout",
    "dropped_limits": "limits",
    "dropped_queue": "queue",
}
# Plain counters: key -> (metric name, help).
_SERVER_COUNTERS = {
    "received": ("fastknockd_received_total", "Control messages received (UDP datagrams "
                 "and TCP messages), including rejected ones."),
    "sessions": ("fastknockd_sessions_total", "UDP control sessions started (first "
                 "message passed basic auth)."),
    "tcp_connections": ("fastknockd_tcp_connections_total", "TCP control connections."),
    "knocked": ("fastknockd_knocks_total", "Successful knocks (lease installed)."),
    "revoked": ("fastknockd_revokes_total", "Successful revokes (lease removed)."),
    "firewall_errors": ("fastknockd_firewall_errors_total", "Firewall requests that failed "
                        "or were refused by fastknockfwd."),
    "outcome_ok": ("fastknockd_sessions_ok_total", "Sessions that ended with COMEIN."),
    "udp_errors": ("fastknockd_udp_errors_total", "Errors reported by the UDP socket."),
    "udp_send_dropped": ("fastknockd_udp_send_dropped_total", "Replies dropped on a full "
                         "socket send buffer."),
    "udp_batches": ("fastknockd_udp_batches_total", "recvmmsg batches read by the batched "
                    "receive path."),
    "udp_handed_up": ("fastknockd_udp_handed_up_total", "Datagrams the batched receive path "
                      "passed on to the session logic."),
    "udp_live_hits": ("fastknockd_udp_live_session_datagrams_total", "Datagrams of peers "
                      "with a live session (batched receive path)."),
    "udp_reader_errors": ("fastknockd_udp_reader_errors_total", "Receive errors and handler "
                          "failures in the batched receive path."),
    "tcp_aborted": ("fastknockd_tcp_aborted_total", "TCP control connections that broke "
                    "off."),
}  # fmt: skip


def server_families(
    counters: Mapping[str, int], active_sessions: int, info: Mapping[str, str] | None = None
) -> list[Family]:
    """fastknockd's metric families from ``Controller.counters``."""
    fams = [
        Family(
            "fastknockd_rejected_total",
            "counter",
            "Control messages rejected or dropped, by reason.",
            [
                Sample(counters.get(key, 0), (("reason", label),))
                for key, label in _REJECTS.items()
            ],  # fmt: skip
        )
    ]
    for key, (name, text) in _SERVER_COUNTERS.items():
        fams.append(Family(name, "counter", text, [Sample(counters.get(key, 0))]))
    fams.append(
        Family(
            "fastknockd_sessions_active",
            "gauge",
            "Control sessions in progress.",
            [Sample(active_sessions)],
        )
    )
    other = sorted(k for k in counters if k not in _REJECTS and k not in _SERVER_COUNTERS)
    if other:
        fams.append(
            Family(
                "fastknockd_other_total",
                "counter",
                "Other fastknockd counters, by internal name.",
                [Sample(counters[k], (("counter", k),)) for k in other],
            )
        )
    if info:
        fams.append(
            Family(
                "fastknockd_info",
                "gauge",
                "Build and runtime information.",
                [Sample(1, tuple(sorted(info.items())))],
            )
        )
    return fams


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


def fwd_families(stats: Mapping[str, int]) -> list[Family]:
    """fastknockfwd's metric families from ``Daemon.stats`` (plus its ``counts``)."""
    fams = [
        Family(name, "counter", text, [Sample(stats.get(key, 0))])
        for key, (name, text) in _FWD_COUNTERS.items()
    ]
    fams.append(
        Family(
            "fastknockfwd_leases",
            "gauge",
            "Live leases (port set elements and jump rules) the daemon knows of.",
            [Sample(stats.get("live", 0))],
        )
    )
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
