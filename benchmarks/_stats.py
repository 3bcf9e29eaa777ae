"""The one summary every benchmark script reports: median, min, quartiles, max of repeated measurements."""
from __future__ import annotations

import statistics

__all__ = ["spread"]


def spread(values: list[float]) -> dict[str, float]:
    """``{"median", "min", "q1", "q3", "max"}`` of ``values`` (one value: all five equal it)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "q1": q[0], "q3": q[2], "max": max(values)}
