"""Shared measurement for every `sana-rl bench` suite: warm-up, repeats, median and spread, ratios.

A suite is a module `bench/<name>.py` with `run(quick: bool) -> list[Row]`. It measures its subject and
its baseline in the same process, interleaved, so machine noise hits both alike; the ratio is what a
reader compares against the target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(kw_only=True, slots=True)
class Timing:
    median_s: float
    iqr_s: float
    """Inter-quartile range of the repeats: the spread."""
    repeats: int


@dataclass(kw_only=True, slots=True)
class Row:
    """One line of a suite's table: a measured value, its baseline and the ratio between them."""

    suite: str
    case: str
    metric: str
    """What `value` is, with its unit, e.g. 'images/s' or 'ms/forward'."""
    value: float
    baseline_name: str = ""
    baseline: float | None = None
    ratio: float | None = None
    """value / baseline, oriented so that > 1 is better for us (the suite decides)."""
    target: str = ""
    """The target read against the ratio, e.g. '>= 1.0x'; '' when there is none."""
    met: bool | None = None
    spread: float | None = None
    """IQR of `value` in the same unit, when measured from repeats."""
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> Timing:
    """Time `fn` after warm-up; returns the median and IQR of the wall times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _timing(times)


def measure_pair(
    ours: Callable[[], object], base: Callable[[], object], *, warmup: int = 2, repeats: int = 5
) -> tuple[Timing, Timing]:
    """Time two functions interleaved (ours, base, ours, base, ...) so drift hits both alike."""
    for _ in range(warmup):
        ours()
        base()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        base()
        b.append(time.perf_counter() - t0)
    return _timing(a), _timing(b)


def _timing(times: list[float]) -> Timing:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(median_s=statistics.median(times), iqr_s=q[2] - q[0], repeats=len(times))


def speed_row(
    suite: str,
    case: str,
    ours: Timing,
    base: Timing,
    *,
    baseline_name: str,
    target: float | None,
    unit: str = "ms",
) -> Row:
    """A latency comparison as a Row: ratio = baseline time / our time (> 1: we are faster)."""
    scale = 1e3 if unit == "ms" else 1.0
    ratio = base.median_s / ours.median_s
    return Row(
        suite=suite,
        case=case,
        metric=f"{unit} (median)",
        value=ours.median_s * scale,
        baseline_name=baseline_name,
        baseline=base.median_s * scale,
        ratio=ratio,
        target=f">= {target}x" if target is not None else "",
        met=None if target is None else ratio >= target,
        spread=ours.iqr_s * scale,
    )
