"""Latency of several runners on the same batch, interleaved so that machine noise hits all of them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

__all__ = ["interleaved_times", "interleaved_latency"]

Runner = Callable[[np.ndarray], object]


def interleaved_times(runners: dict[str, Runner], batch: np.ndarray, rounds: int,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every runner on ``batch``, ``rounds`` times, one runner after the other in each round."""
    for run in runners.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_latency(runners: dict[str, Runner], batch: np.ndarray, rounds: int,
                        warmup: int = 2, baseline: str | None = None) -> dict[str, dict[str, float]]:
    """Per runner: median latency (ms) over ``rounds``; with ``baseline``, the median and spread of the per-round
    ratio ``baseline / runner`` (the speed-up; > 1 means faster than the baseline)."""
    times = interleaved_times(runners, batch, rounds, warmup)
    out = {}
    for name, ts in times.items():
        entry = {"median_ms": 1000 * statistics.median(ts), "min_ms": 1000 * min(ts), "rounds": len(ts)}
        if baseline is not None:
            ratios = [b / t for b, t in zip(times[baseline], ts)]
            entry |= {"speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                      "speedup_max": max(ratios)}
        out[name] = entry
    return out
