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
    memory_bandwidth: float   # bytes/s of all workers together (the datasheet peak on a GPU)
    peak_flops: float         # flop/s of all workers together (dense BF16 tensor throughput on a GPU)
    task_overhead: float      # seconds a worker spends per task besides its work (dispatch, counters)
    event_latency: float      # seconds from a signal until a waiting worker sees it
    min_columns: int          # narrowest column tile worth its own task
    sustained_fraction: float = 1.0   # share of the peak bandwidth and flop rate that tasks reach
    l2_bytes: int = 0                 # last-level cache, 0 where unknown
    clock_hz: float = 0.0             # SM clock at which peak_flops is quoted, 0 where unknown

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise CompileError(f"target {self.name!r} has workers={self.workers}; use at least 1 worker")
        if not 0.0 < self.sustained_fraction <= 1.0:
            raise CompileError(
                f"target {self.name!r} has sustained_fraction={self.sustained_fraction}; "
                "use a fraction of the peak rates in (0, 1], such as 0.9"
            )

    @property
    def tiling(self) -> TilingPlan:
        return TilingPlan(self.workers, self.min_columns)

    def task_seconds(self, bytes_moved: int, flops: int) -> float:
        """Return the time of one task on one worker: the roofline of its bytes and flops
        plus the per-task overhead. This is the one cost function of mpk: the compiler's
        estimates and the simulator's predictions both come from it.

        Each worker gets 1/workers of the machine's bandwidth and flop rate, derated by
        ``sustained_fraction`` (``worker_bandwidth``, ``worker_flops``).
        """
        return self.task_overhead + max(bytes_moved / self.worker_bandwidth, flops / self.worker_flops)

    @property
    def worker_bandwidth(self) -> float:
        """Bytes/s one worker streams: its share of the sustained bandwidth."""
        return self.memory_bandwidth * self.sustained_fraction / self.workers

    @property
    def worker_flops(self) -> float:
        """Flop/s one worker computes: its share of the sustained flop rate."""
        return self.peak_flops * self.sustained_fraction / self.workers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        # Files written before a field existed get the field's default.
        return cls(**data)


def cpu_target(workers: int | None = None) -> Target:
    """Return a CPU target. NOTE: bandwidth and flops are round estimates for a recent x86 server
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


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of one GPU part; the comments in _GPUS name where each comes from."""

    part: str
    sms: int
    hbm_bandwidth: float      # bytes/s
    l2_bytes: int
    clock_hz: float           # SM clock at which the tensor throughput is quoted
    bf16_dense_flops: float   # flop/s, tensor cores, without 2:4 sparsity


MIB = 2**20  # L2 sizes read as MiB; the pages below write "MB" without saying which

# NOTE: no NVIDIA datasheet could be opened while writing this table. Every figure comes
# from a third-party page that reproduces NVIDIA's specifications, named beside it, and
# "estimate" marks the figures that no opened page states. Check them against a datasheet.
_GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec(
        part="A100-SXM4-80GB",
        sms=108,                    # fudzilla.com/news/ai/50832 (NVIDIA's launch table): 108 SMs
        hbm_bandwidth=2039e9,       # glennklockwood.com/garden/processors/A100: 2.039 TB/s for the 80 GB SXM4 part
        l2_bytes=40 * MIB,          # fudzilla.com/news/ai/50832: 40960 KB of L2
        clock_hz=1410e6,            # fudzilla.com/news/ai/50832: up to 1410 MHz
        bf16_dense_flops=312e12,    # glennklockwood.com/garden/processors/A100 (citing NVIDIA's A100 datasheet): BF16 matrix 312 TFLOPS
    ),
    "h100": GpuSpec(
        part="H100-SXM5-80GB",
        sms=132,                    # archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html (NVIDIA's H100 table): 132 SMs
        hbm_bandwidth=3350e9,       # same page: 3,350 GB/s
        l2_bytes=50 * MIB,          # same page: 50 MB L2
        clock_hz=1830e6,            # glennklockwood.com/garden/processors/h100: 1.83 GHz for low precision (1.98 GHz max boost)
        bf16_dense_flops=989.4e12,  # glennklockwood.com/garden/processors/h100: BF16 matrix 989.4 TFLOPS (hpctech: 1,979 with sparsity)
    ),
    "h200": GpuSpec(
        part="H200-SXM-141GB",
        sms=132,                    # saulelectric.com/nvidia-h200.html: 132 SMs; aiwiki.ai/wiki/nvidia_h200: the same GH100 silicon as H100
        hbm_bandwidth=4800e9,       # aiwiki.ai/wiki/nvidia_h200: 141 GB at 4.8 TB/s
        l2_bytes=50 * MIB,          # estimate: H100's L2, since the die is the same; no opened page states it for H200
        clock_hz=1830e6,            # estimate: H100's, since the compute figures are H100's
        bf16_dense_flops=989.4e12,  # itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html: FP16/BF16 dense ~989 TFLOPS
    ),
    "b200": GpuSpec(
        part="B200 (HGX, 1000 W)",
        sms=148,                    # chipsandcheese.com/p/nvidias-b200-keeping-the-cuda-juggernaut: 74 SMs per die, 148 in all
        hbm_bandwidth=8000e9,       # glennklockwood.com/garden/processors/B200 and docs.vultr.com HGX B200 overview: 8 TB/s
                                    # (github.com/pytorch/ao/pull/4002 derives 7.67 TB/s from the bus width the driver reports)
        l2_bytes=int(126.5 * MIB),  # github.com/pytorch/ao/pull/4002: cudaGetDeviceProperties reports 126.50 MB of L2
        clock_hz=1860e6,            # hmc-tech.com/gpus/nvidia-b200-vs-nvidia-b100: tensor clock 1.86 GHz (boost 1.98 GHz)
        bf16_dense_flops=2250e12,   # glennklockwood.com/garden/processors/B200: HGX B200 at 1000 W, BF16 matrix 2250 TFLOPS
    ),
}

# Estimates for a persistent kernel on any of these GPUs: the time a worker spends per
# task besides its loads (dispatch, counter updates), the time from a release increment
# until a polling worker reads it, and the share of peak bandwidth that streaming loads
# reach. None of them is measured yet.
GPU_TASK_OVERHEAD = 1e-6
GPU_EVENT_LATENCY = 1e-6
GPU_SUSTAINED_FRACTION = 0.9


def gpu_names() -> list[str]:
    return sorted(_GPUS)


def gpu_spec(name: str) -> GpuSpec:
    """Look up a GPU by its short name (a100, h100, h200, b200)."""
    try:
        return _GPUS[name.lower()]
    except KeyError:
        raise CompileError(f"unknown target {name!r}; use cpu or a GPU: {', '.join(gpu_names())}") from None


def gpu_target(name: str) -> Target:
    spec = gpu_spec(name)
    return Target(
        name, "gpu", spec.sms, spec.hbm_bandwidth, spec.bf16_dense_flops,
        task_overhead=GPU_TASK_OVERHEAD, event_latency=GPU_EVENT_LATENCY, min_columns=16,
        sustained_fraction=GPU_SUSTAINED_FRACTION, l2_bytes=spec.l2_bytes, clock_hz=spec.clock_hz,
    )


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
