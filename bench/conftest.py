"""pytest-benchmark helpers for bench/: a ``measure`` fixture that records each
benchmark's mean, and a terminal summary that prints baseline_mean / mean ratios for
everything measured in the same run.

Run: ``pytest bench -p no:cacheprovider --benchmark-enable`` (pyproject disables
benchmarks by default so the test suite stays fast). Benchmarks assert results, never time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

BASELINE = "baseline"
# label -> (mean, min) seconds per call
STATS: dict[str, tuple[float, float]] = {}

# Fixed, equal work for every benchmark: 200 calls per timed round (so the timer's own
# cost is negligible next to a ~1 us call), 300 rounds, after 20 warm-up rounds.
ITERATIONS, ROUNDS, WARMUP = 200, 300, 20


@pytest.fixture
def measure(benchmark: Any) -> Callable[..., Any]:
    """measure(label, fn, *args): benchmark fn(*args), remember its mean and min."""

    def run(label: str, fn: Callable[..., Any], *args: Any) -> Any:
        result = benchmark.pedantic(
            fn, args=args, iterations=ITERATIONS, rounds=ROUNDS, warmup_rounds=WARMUP
        )
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None when benchmarks are disabled
            STATS[label] = (stats.stats.mean, stats.stats.min)
        return result

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if BASELINE not in STATS:
        return
    base_mean, base_min = STATS[BASELINE]
    tr = terminalreporter
    tr.section("speed-up vs baseline: baseline_mean / mean (and the same for min)")
    tr.write_line(f"{'benchmark':<28} {'mean':>9} {'ratio':>7} {'min':>9} {'ratio':>7}")
    for label, (mean, low) in sorted(STATS.items(), key=lambda item: item[1][0]):
        tr.write_line(
            f"{label:<28} {mean * 1e9:>7.0f}ns {base_mean / mean:>6.2f}x"
            f" {low * 1e9:>7.0f}ns {base_min / low:>6.2f}x"
        )
