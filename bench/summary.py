"""Latency summaries (pure): percentiles of per-pod samples, and phase totals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def evenly(items: list[T], k: int) -> list[T]:
    """k items spread over the list (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted samples."""
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Latency:
    """Distribution of per-item latencies, in milliseconds."""

    count: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, samples_ms: list[float]) -> Latency:
        ordered = sorted(samples_ms)
        return cls(
            count=len(ordered),
            min_ms=ordered[0],
            p50_ms=percentile(ordered, 0.50),
            p90_ms=percentile(ordered, 0.90),
            p99_ms=percentile(ordered, 0.99),
            max_ms=ordered[-1],
            mean_ms=sum(ordered) / len(ordered),
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Phase:
    """One method over a set of pods: latencies, wall time and CPU (this process + children)."""

    latency: Latency
    wall_s: float
    cpu_s: float

    @property
    def throughput(self) -> float:
        """Pods per second of wall time."""
        return self.latency.count / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def cpu_ms_per_pod(self) -> float:
        return self.cpu_s * 1000 / self.latency.count

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency": self.latency.as_dict(),
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            "throughput_pods_per_s": round(self.throughput, 1),
            "cpu_ms_per_pod": round(self.cpu_ms_per_pod, 4),
        }


def merge(phases: list[Phase], samples_ms: list[float]) -> Phase:
    """Rounds of the same method (small N is repeated to get enough samples) as one phase."""
    return Phase(
        latency=Latency.of(samples_ms),
        wall_s=sum(p.wall_s for p in phases),
        cpu_s=sum(p.cpu_s for p in phases),
    )
