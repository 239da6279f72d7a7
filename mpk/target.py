"""Descriptions of the machines a task graph is compiled for.

A target fixes the worker count (SMs on a GPU, threads on a CPU) and the figures the
cost model uses to size tiles, balance the static assignment and estimate latency.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from mpk.errors import CompileError
from mpk.ops import TilingPlan


@dataclass(frozen=True)
class Target:
    name: str
    kind: str                 # "cpu" or "gpu"
    workers: int
    memory_bandwidth: float   # bytes/s sustained by all workers together
    peak_flops: float         # flop/s of all workers together
    task_overhead: float      # seconds a worker spends per task besides its work (dispatch, counters)
    event_latency: float      # seconds from a signal until a waiting worker sees it
    min_columns: int          # narrowest column tile worth its own task

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise CompileError(f"target {self.name!r} has workers={self.workers}; use at least 1 worker")

    @property
    def tiling(self) -> TilingPlan:
        return TilingPlan(self.workers, self.min_columns)

    def task_seconds(self, bytes_moved: int, flops: int) -> float:
        """Roofline time of one task on one worker, which gets 1/workers of the machine."""
        per_worker_bw = self.memory_bandwidth / self.workers
        per_worker_flops = self.peak_flops / self.workers
        return self.task_overhead + max(bytes_moved / per_worker_bw, flops / per_worker_flops)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        return cls(**data)


def cpu_target(workers: int | None = None) -> Target:
    """A CPU target. NOTE: bandwidth and flops are round estimates for a recent x86 server
    core with AVX2; the CPU backend measures real bandwidth when it benchmarks.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise CompileError(f"--workers must be at least 1, got {workers}")
    return Target(
        name=f"cpu-{workers}",
        kind="cpu",
        workers=workers,
        memory_bandwidth=10e9 * min(workers, 8),
        peak_flops=50e9 * workers,
        task_overhead=0.3e-6,
        event_latency=0.2e-6,
        min_columns=16,
    )


# SM count and HBM bandwidth of NVIDIA's SXM parts, from NVIDIA's product datasheets;
# dense BF16 tensor-core throughput. Overheads are estimates for a persistent kernel.
_GPUS = {
    "a100": (108, 2039e9, 312e12),
    "h100": (132, 3350e9, 989e12),
    "h200": (132, 4800e9, 989e12),
    "b200": (148, 8000e9, 2250e12),
}


def gpu_target(name: str) -> Target:
    key = name.lower()
    if key not in _GPUS:
        raise CompileError(f"unknown target {name!r}; use cpu or a GPU: {', '.join(sorted(_GPUS))}")
    sms, bandwidth, flops = _GPUS[key]
    return Target(name, "gpu", sms, bandwidth, flops, task_overhead=1e-6, event_latency=1e-6, min_columns=16)


def make_target(spec: str, workers: int | None = None) -> Target:
    """Resolve a --target value: ``cpu`` (with --workers) or a GPU name."""
    if spec == "cpu":
        return cpu_target(workers)
    target = gpu_target(spec)
    if workers is not None:
        if not 1 <= workers <= target.workers:
            raise CompileError(
                f"--workers {workers} is invalid for {target.name}: one worker runs per SM and every worker must be "
                f"resident, so use 1 to {target.workers}"
            )
        target = Target(**{**target.to_dict(), "workers": workers})
    return target
