"""Timing contenders so that their ratio survives a busy machine.

Why interleaved rounds: timing each contender in its own block lets a burst of load from another
process land on whichever runs then (a busy run once gave PGD-10 at 0.71 x its floor and PGD-40 at
1.33 x in the same process). Here the contenders run A B C, A B C, ... for several rounds after a
warm-up round, so each round's ratio compares runs seconds apart under the same load; the figure is
the median of the per-round ratios, with min and max, and the load average before and after. Each run
also records its CPU time across all threads (``resource.getrusage``), which a busy machine inflates
far less than wall time. A contender that runs in another process returns :class:`Measured`, the
wall and CPU seconds that process measured for itself (this one cannot see a live child's CPU time).
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: A ratio whose (max - min) / median over the rounds exceeds this is flagged as not meaningful.
MAX_RELATIVE_SPREAD = 0.25


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Measured:
    """What a run timed itself (e.g. a worker process): its wall and CPU seconds."""

    wall: float
    cpu: float


@dataclass
class Timings:
    """Wall and CPU seconds of every contender, one entry per round (warm-up excluded)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    repeats: dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def ratio(self, numerator: str, denominator: str) -> dict[str, Any]:
        """Median, min and max of the per-round wall-time ratios (and the CPU-time one), with a verdict."""
        walls = [a / b for a, b in zip(self.wall[numerator], self.wall[denominator], strict=True)]
        cpus = [a / b for a, b in zip(self.cpu[numerator], self.cpu[denominator], strict=True)]
        median = statistics.median(walls)
        spread = (max(walls) - min(walls)) / median if median else float("inf")
        return {
            "median": round(median, 4),
            "min": round(min(walls), 4),
            "max": round(max(walls), 4),
            "rounds": len(walls),
            "cpu_time_median": round(statistics.median(cpus), 4),
            "relative_spread": round(spread, 4),
            "meaningful": spread <= MAX_RELATIVE_SPREAD,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "wall_seconds": {k: [round(v, 4) for v in vs] for k, vs in self.wall.items()},
            "cpu_seconds": {k: [round(v, 4) for v in vs] for k, vs in self.cpu.items()},
            "runs_per_timing": self.repeats,
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
        }


def interleaved(
    contenders: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    min_seconds: float = 2.0,
) -> Timings:
    """Run every contender in turn, ``warmup`` + ``rounds`` times; time the last rounds (seconds per run).

    A contender faster than ``min_seconds`` is run several times in a row within each round (the count
    set in the warm-up, as ``timeit`` does): a sub-second run is at the mercy of every scheduler tick.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so queued GPU work is
    counted where it was launched.
    """
    if rounds < 1 or warmup < 1:
        raise ValueError("rounds and warmup must be >= 1")
    timings = Timings(load_before=[round(v, 2) for v in os.getloadavg()])
    repeats = dict.fromkeys(contenders, 1)
    for index in range(warmup + rounds):
        for name, run in contenders.items():
            wall, cpu = _timed(run, repeats[name], sync)
            if index < warmup:  # calibrate: enough runs in a row to fill min_seconds
                repeats[name] = max(repeats[name], math.ceil(min_seconds / max(wall, 1e-6)))
            else:
                timings.wall.setdefault(name, []).append(wall)
                timings.cpu.setdefault(name, []).append(cpu)
    timings.repeats = repeats
    timings.load_after = [round(v, 2) for v in os.getloadavg()]
    return timings


def _timed(run: Callable[[], object], repeats: int, sync: Callable[[], None] | None) -> tuple[float, float]:
    """Wall and CPU seconds of one run, averaged over ``repeats`` runs in a row (the runs' own
    figures when every run returned :class:`Measured`)."""
    if sync:
        sync()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    results = [run() for _ in range(repeats)]
    if sync:
        sync()
    wall, cpu = (time.perf_counter() - wall) / repeats, (_cpu_seconds() - cpu) / repeats
    measured = [r for r in results if isinstance(r, Measured)]
    if len(measured) == repeats:
        return sum(r.wall for r in measured) / repeats, sum(r.cpu for r in measured) / repeats
    return wall, cpu
