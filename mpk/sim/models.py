"""The four execution models the simulator compares, and the launch costs they charge.

Every model runs the same tasks with the same per-task durations (the roofline of each
task plus the target's task overhead), so the differences between the models come only
from launches, waves and what may overlap:

- megakernel, static: one launch per iteration. Each SM runs its list in order and loads
  the next task's weights while it waits for that task's event (``engine.run_static``).
- megakernel, dynamic: one launch. A fired event's consumers go to the SMs free first,
  which learn their task only then and so cannot prefetch (``engine.run_dynamic``).
- kernel per operator: one kernel per operator, launched from the host. A kernel's tasks
  run in waves over the SMs, and a kernel starts only after the one before has ended.
- CUDA graph with programmatic dependent launch (PDL): the same kernels launched as one
  graph; each kernel is launched early and runs its prologue under the tail of the
  kernel before, but its tasks still wait for that kernel to end.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from mpk.sim.engine import Timeline, run_dynamic, run_static
from mpk.sim.workload import RELAY, Workload
from mpk.target import Target

MEGAKERNEL_STATIC = "megakernel, static"
MEGAKERNEL_DYNAMIC = "megakernel, dynamic"
KERNEL_PER_OPERATOR = "kernel per operator"
CUDA_GRAPH_PDL = "CUDA graph + PDL"


@dataclass(frozen=True)
class ExecutionCosts:
    """Fixed costs of launching and synchronizing work, in seconds.

    NOTE: only kernel_gap comes from a measurement: Hazy Research's, on an H100 with CUDA
    graphs, as summarized at mlops.substack.com/p/one-megakernel-to-rule-llama-1b.
    host_launch is the middle of the 4-6 us per launch measured on an RTX 5070 Ti at
    susun-blog.com/blog/pegainfer-3-cuda-graph. The others are estimates.
    """

    host_launch: float = 4.5e-6       # host time to issue one kernel or one graph launch
    kernel_gap: float = 1.3e-6        # from a kernel's end (or its issue) until the next kernel's blocks run
    pdl_gap: float = 0.5e-6           # the same gap when the next kernel waits in cudaGridDependencySynchronize
    kernel_prologue: float = 1.0e-6   # a kernel's setup before its first load (indexing, barriers, shared memory)
    event_latency: float = 1.0e-6     # megakernel: a signal until a polling SM reads it
    dispatch_latency: float = 2.0e-6  # dynamic dispatch: an event firing until its consumer starts on an SM
    prefetch_weights: bool = True     # static megakernel: load the next task's weights while waiting for its event

    @classmethod
    def for_target(cls, target: Target) -> "ExecutionCosts":
        """Take the event latency from the target. A dispatch costs two of them, because
        the scheduler reads the event and then the SM reads its queue entry.
        """
        return cls(event_latency=target.event_latency, dispatch_latency=2 * target.event_latency)


@dataclass(frozen=True)
class Prediction:
    model: str
    seconds: float                    # one iteration, launch included
    timeline: Timeline | None = None  # per-task times, from the launch's first task (megakernel models)


def megakernel_static(work: Workload, costs: ExecutionCosts) -> Prediction:
    timeline = run_static(work, costs.event_latency, costs.prefetch_weights)
    return Prediction(MEGAKERNEL_STATIC, _megakernel_launch(costs) + timeline.makespan, timeline)


def megakernel_dynamic(work: Workload, costs: ExecutionCosts) -> Prediction:
    timeline = run_dynamic(work, costs.dispatch_latency)
    return Prediction(MEGAKERNEL_DYNAMIC, _megakernel_launch(costs) + timeline.makespan, timeline)


def _megakernel_launch(costs: ExecutionCosts) -> float:
    return costs.host_launch + costs.kernel_gap + costs.kernel_prologue


def kernel_per_operator(work: Workload, costs: ExecutionCosts) -> Prediction:
    """Kernel i is issued by the host at (i + 1) * host_launch, since the host issues
    launches back to back. It starts kernel_gap + kernel_prologue after both its issue
    and the end of kernel i - 1.
    """
    end = 0.0
    for i, spans in enumerate(kernel_waves(work)):
        start = max(end, (i + 1) * costs.host_launch) + costs.kernel_gap + costs.kernel_prologue
        end = start + spans
    return Prediction(KERNEL_PER_OPERATOR, end)


def cuda_graph_pdl(work: Workload, costs: ExecutionCosts) -> Prediction:
    """One graph launch. Kernel i + 1 is launched when kernel i starts, so its prologue
    overlaps kernel i. Its tasks start pdl_gap after kernel i ends, or when its prologue
    is done if that is later.
    """
    start = end = 0.0
    for i, spans in enumerate(kernel_waves(work)):
        if i == 0:
            start = costs.host_launch + costs.kernel_gap + costs.kernel_prologue
        else:
            start = max(end + costs.pdl_gap, start + costs.kernel_prologue)
        end = start + spans
    return Prediction(CUDA_GRAPH_PDL, end)


def kernel_waves(work: Workload) -> list[float]:
    """Return how long each operator's kernel runs, operators in increasing index.

    A kernel's tasks, in global order, go to the SM free first. So n equal tasks on W SMs
    take ceil(n / W) waves, and the last wave may leave SMs idle. Relays are dropped,
    since kernel boundaries order everything they would forward.
    """
    tasks: dict[int, list[int]] = {}
    for task, kernel in enumerate(work.kernel):
        if kernel != RELAY:
            tasks.setdefault(kernel, []).append(task)
    spans = []
    for kernel in sorted(tasks):
        free = [0.0] * min(work.workers, len(tasks[kernel]))
        for task in tasks[kernel]:
            heapq.heapreplace(free, free[0] + work.seconds[task])
        spans.append(max(free))
    return spans


def predict_all(work: Workload, costs: ExecutionCosts) -> list[Prediction]:
    """Run the four execution models on one workload."""
    return [
        megakernel_static(work, costs),
        megakernel_dynamic(work, costs),
        kernel_per_operator(work, costs),
        cuda_graph_pdl(work, costs),
    ]
