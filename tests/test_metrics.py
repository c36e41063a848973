"""Prometheus text output (``osutil.metrics``): format, atomic writes, the daemons' families.

The output is read back with an independent little parser of the text exposition format
(below), not with the writer's own code.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest

from fastknock.knockd.counters import Count, Counters, families
from fastknock.osutil import metrics
from fastknock.osutil.metrics import Family, MetricsWriter, Sample, render

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name + sorted labels -> value; asserts the HELP/TYPE structure on the way."""
    assert text.endswith("\n")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "untyped") and name not in typed
            typed[name] = kind
            continue
        m = _LINE.match(line)
        assert m, line
        name, labels_text, value = m.groups()
        assert name in typed, f"{name} has no TYPE line before it"
        labels = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, labels_text[pos:]
                raw = lm.group(2)
                val = re.sub(r"\\(.)", lambda g: "\n" if g.group(1) == "n" else g.group(1), raw)
                labels.append((lm.group(1), val))
                pos = lm.end()
        key = (name, tuple(sorted(labels)))
        assert key not in out, f"duplicate series {key}"
        out[key] = float(value)
    return out


def test_render_format_and_escaping() -> None:
    fams = [
        Family("a_total", "counter", "A count.", [Sample(3)]),
        Family(
            "b",
            "gauge",
            "B with a \\ backslash.",
            [Sample(1.5, (("x", 'q"uo\\te\nnl'),)), Sample(float("inf"), (("x", "inf"),))],
        ),
    ]
    text = render(fams, (("worker", "2"),))
    assert "# HELP b B with a \\\\ backslash.\n# TYPE b gauge\n" in text
    got = parse(text)
    assert got[("a_total", (("worker", "2"),))] == 3
    assert got[("b", (("worker", "2"), ("x", 'q"uo\\te\nnl')))] == 1.5
    assert got[("b", (("worker", "2"), ("x", "inf")))] == float("inf")
    assert render([Family("n", "gauge", "h", [Sample(float("nan"))])]).endswith("n NaN\n")
    assert render([Family("t", "gauge", "h", [Sample(True)])]).endswith("t 1\n")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Family("1bad", "counter", "h"),
        lambda: Family("ok", "histogram", "h"),
        lambda: Family("ok", "gauge", "h", [Sample(1, (("bad-label", "v"),))]),
        lambda: Family("ok", "gauge", "h", [Sample(1, (("__reserved", "v"),))]),
    ],
)
def test_bad_families_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_duplicate_family_is_refused() -> None:
    with pytest.raises(ValueError):
        render([Family("x", "gauge", "h"), Family("x", "gauge", "h")])


def test_write_atomic(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    metrics.write_atomic(str(path), "one\n")
    metrics.write_atomic(str(path), "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]  # no temporary left over


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    w = MetricsWriter(str(tmp_path / "nope" / "m.prom"), lambda: [], 1.0)
    assert w.write() is False and w.writes == 0


def test_a_failing_collect_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    state = {"bad": False}

    def collect() -> list[Family]:
        if state["bad"]:
            return [Family("x", "gauge", "h"), Family("x", "gauge", "h")]  # duplicate
        return [Family("x", "gauge", "h", [Sample(7)])]

    w = MetricsWriter(str(path), collect, 1.0)
    assert w.write()
    state["bad"] = True
    assert not w.write()
    assert parse(path.read_text()) == {("x", ()): 7}
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_worker_path() -> None:
    assert metrics.worker_path("/x/fastknockd.prom", 0, 1) == "/x/fastknockd.prom"
    assert metrics.worker_path("/x/fastknockd.prom", 2, 4) == "/x/fastknockd.worker2.prom"
    assert metrics.worker_path("/x/fk", 1, 2) == "/x/fk.worker1.prom"


def test_server_families_cover_every_reason_from_the_start() -> None:
    got = parse(render(families(Counters(), 0, {"version": "1", "path": "b"})))
    reasons = {dict(lbl)["reason"] for name, lbl in got if name == "fastknockd_rejected_total"}
    assert {"size", "magic", "operation", "unknown-user", "mac", "limits", "timeout"} <= reasons
    assert all(v == 0 for (name, _), v in got.items() if name != "fastknockd_info")
    assert got[("fastknockd_info", (("path", "b"), ("version", "1")))] == 1
    for name in ("received", "sessions", "knocks", "revokes", "firewall_errors"):
        assert (f"fastknockd_{name}_total", ()) in got


def test_every_counter_has_a_series_and_a_typo_fails() -> None:
    """Counter names are an enum: each member is written (as a family of its own or as a
    reason of fastknockd_rejected_total), and a misspelt name cannot become a series."""
    got = parse(render(families(Counters(dict.fromkeys(Count, 7)), 0)))
    assert sum(1 for (name, _), v in got.items() if v == 7) == len(Count)
    with pytest.raises(KeyError):
        Counters()["recieved"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        Count.RECIEVED  # type: ignore[attr-defined]  # noqa: B018


def test_server_families_values() -> None:
    counters = Counters(
        {
            Count.RECEIVED: 10,
            Count.OUTCOME_MAC: 4,
            Count.DROPPED_LIMITS: 2,
            Count.KNOCKED: 1,
            Count.REVOKED: 2,
            Count.SESSIONS: 3,
            Count.FIREWALL_ERRORS: 1,
        }
    )
    got = parse(render(families(counters, 2)))
    assert got[("fastknockd_received_total", ())] == 10
    assert got[("fastknockd_rejected_total", (("reason", "mac"),))] == 4
    assert got[("fastknockd_rejected_total", (("reason", "limits"),))] == 2
    assert got[("fastknockd_knocks_total", ())] == 1
    assert got[("fastknockd_revokes_total", ())] == 2
    assert got[("fastknockd_sessions_total", ())] == 3
    assert got[("fastknockd_firewall_errors_total", ())] == 1
    assert got[("fastknockd_sessions_active", ())] == 2


def test_fwd_families() -> None:
    stats = dict(requests=5, acks=4, nacks=1, transactions=2, changes=4, fallbacks=0, live=3)
    stats.update(batches=2, status_ack=4, status_limit=1)
    got = parse(render(metrics.fwd_families(stats)))
    assert got[("fastknockfwd_requests_total", ())] == 5
    assert got[("fastknockfwd_batches_total", ())] == 2
    assert got[("fastknockfwd_leases", ())] == 3
    assert got[("fastknockfwd_replies_total", (("status", "limit"),))] == 1
    assert got[("fastknockfwd_failed_transactions_total", ())] == 0


def test_fwd_families_with_the_prefilter_counters() -> None:
    counts = {"dropped_size": 3, "dropped_ip4": 7, "spared_ip4": 11, "proven": 2}
    counts.update(dropped_ip6=0, dropped_ip6group=5, spared_ip6=0, spared_ip6group=0)
    got = parse(render(metrics.fwd_families({}, counts)))
    assert got[("fastknockfwd_prefilter_dropped_total", (("reason", "size"),))] == 3
    assert got[("fastknockfwd_prefilter_dropped_total", (("reason", "ip4"),))] == 7
    assert got[("fastknockfwd_prefilter_dropped_total", (("reason", "ip6group"),))] == 5
    assert got[("fastknockfwd_prefilter_spared_total", (("reason", "ip4"),))] == 11
    assert got[("fastknockfwd_prefilter_proven_total", ())] == 2
    without = parse(render(metrics.fwd_families({})))  # no pre-filter: no such families
    assert not any(name.startswith("fastknockfwd_prefilter") for name, _ in without)


def test_writer_task_writes_periodically_and_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "fastknockd.prom"
    counters = Counters()

    async def main() -> int:
        w = MetricsWriter(str(path), lambda: families(counters, 0), 0.02)
        w.start()
        for _ in range(200):
            if w.writes >= 3:
                break
            counters[Count.RECEIVED] += 1
            await asyncio.sleep(0.01)
        counters[Count.RECEIVED] = 1234
        await w.stop()
        return w.writes

    writes = asyncio.run(main())
    assert writes >= 4  # three periodic ones and the final one
    assert parse(path.read_text())[("fastknockd_received_total", ())] == 1234
    assert os.listdir(tmp_path) == ["fastknockd.prom"]


def test_writer_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MetricsWriter(str(tmp_path / "m"), lambda: [], 0)


def test_fwd_daemon_counts_requests_batches_leases_and_errors() -> None:
    from fastknock.ipc import FwOp
    from tests.test_fwd import daemon, req

    d = daemon()

    async def main() -> None:
        await asyncio.gather(d.submit(req(1)), d.submit(req(2, "192.0.2.2")))
        await d.submit(req(3))  # port 0: refused before any batch
        await d.submit(req(1, op=FwOp.REVOKE))

    asyncio.run(main())
    got = parse(render(d.metric_families()))
    assert got[("fastknockfwd_requests_total", ())] == 4
    assert got[("fastknockfwd_acks_total", ())] == 3
    assert got[("fastknockfwd_nacks_total", ())] == 1
    assert got[("fastknockfwd_replies_total", (("status", "bad_port"),))] == 1
    assert got[("fastknockfwd_replies_total", (("status", "ack"),))] == 3
    assert 2 <= got[("fastknockfwd_batches_total", ())] <= 3  # the first two may share one
    assert got[("fastknockfwd_leases", ())] == 2  # tcp/22 revoked; tcp+udp/53 live
    assert got[("fastknockfwd_failed_transactions_total", ())] == 0


def test_write_atomic_replaces_a_planted_link(tmp_path: Path) -> None:
    """A symlink planted at the metrics path (by whoever can write the textfile directory)
    is replaced by the new file, never followed: the target keeps its content and mode.
    (fastknockfwd writes its metrics as its own account since issue 12; this holds for any
    writer.)"""
    target = tmp_path / "target"
    target.write_text("keep\n")
    target.chmod(0o600)
    path = tmp_path / "fastknockfwd.prom"
    path.symlink_to(target)
    metrics.write_atomic(str(path), "fresh\n")
    assert not path.is_symlink() and path.read_text() == "fresh\n"
    assert target.read_text() == "keep\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
