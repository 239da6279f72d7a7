"""Per-task work of a compiled task graph on one device, and the memory floor it cannot beat.

Costs come from the operator specs, as in the compiler, with two differences that make
them describe one decode step on the device instead of the compiler's generic estimate:

- element sizes are those the backend stores. On a GPU, the CUDA backend keeps weights,
  activations and the KV cache in bf16 and only the logits and argmax maxima in fp32,
  whereas the compiled graph declares fp32 activations and state;
- operators with a ``context`` attribute (attention) are costed with that many KV slots
  filled before the iteration, instead of the compiler's guess of a cache half full.

Durations then come from ``Target.task_seconds``, the compiler's own cost function.
On a GPU, the weight bytes of operators whose kernels prefetch them into L2 also give
each task's prefetchable time, at the worker's share of the bandwidth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import SimulationError
from mpk.ir.tensor import DTYPE_BYTES, TensorKind, TensorSpec
from mpk.ops import Cost, spec_of
from mpk.ops.base import Op, OpSpec, role_tensor
from mpk.sim.workload import RELAY, Workload
from mpk.target import Target


def device_tensors(tg: TaskGraph) -> dict[str, TensorSpec]:
    """Return the graph's tensors with the element types the target's backend stores."""
    if tg.target.kind != "gpu":
        return dict(tg.graph.tensors)
    from mpk.backends.cuda.codegen import buffer_dtypes

    buffers = buffer_dtypes(tg)
    return {
        name: dataclasses.replace(spec, dtype=buffers[tg.placement.home[name]])
        for name, spec in tg.graph.tensors.items()
    }


def with_context(op: Op, context: int | None) -> Op:
    """Return ``op`` costed with ``context`` KV slots filled, if its spec takes a context."""
    if context is None or "context" not in spec_of(op.kind).attributes:
        return op
    return dataclasses.replace(op, attrs={**op.attrs, "context": context})


def task_costs(tg: TaskGraph, tensors: dict[str, TensorSpec], context: int | None) -> list[Cost]:
    """Return the bytes and flops of every task in global order; relays do no work."""
    ops = [with_context(op, context) for op in tg.graph.ops]
    costs = []
    for task in range(tg.num_tasks):
        index = tg.op[task]
        if index == RELAY:
            costs.append(Cost(0, 0))
            continue
        op = ops[index]
        costs.append(spec_of(op.kind).cost(op, tensors, tg.tile[task]))
    return costs


def prefetch_bytes(tg: TaskGraph, tensors: dict[str, TensorSpec], task: int) -> int:
    """Return the weight bytes a task can load before its event fires: those of operators
    whose CUDA kernels prefetch their weights (``cuda_prefetch``), 0 for the others.
    """
    index = tg.op[task]
    if index == RELAY:
        return 0
    op = tg.graph.ops[index]
    spec = spec_of(op.kind)
    if type(spec).cuda_prefetch is OpSpec.cuda_prefetch:
        return 0
    total = 0
    for access in spec.accesses(op, tensors, tg.tile[task]):
        tensor = tensors[role_tensor(op, access.role)]
        if tensor.kind is TensorKind.WEIGHT and not access.write:
            volume = 1
            for lo, hi in access.box:
                volume *= hi - lo
            total += volume * DTYPE_BYTES[tensor.dtype]
    return total


def workload_from_taskgraph(tg: TaskGraph, target: Target | None = None, context: int | None = None) -> Workload:
    """Build the simulator's input from a compiled task graph.

    ``target`` supplies the rates (default: the one the graph was compiled for); it must
    have as many workers as the graph. With ``context``, attention reads that many KV slots.
    """
    target = target or tg.target
    if target.workers != tg.target.workers:
        raise SimulationError(
            f"target {target.name!r} has {target.workers} workers but the task graph was compiled for {tg.target.workers}; "
            "simulate with the worker count it was compiled for"
        )
    tensors = device_tensors(tg)
    costs = task_costs(tg, tensors, context)
    seconds = [target.task_seconds(c.bytes, c.flops) for c in costs]
    labels = [tg.graph.ops[o].name if o != RELAY else "relay" for o in tg.op]
    prefetch: list[float] = []
    if target.kind == "gpu":
        # Prefetching shortens only the load part of a task, never its overhead.
        prefetch = [
            min(prefetch_bytes(tg, tensors, task) / target.worker_bandwidth, seconds[task] - target.task_overhead)
            for task in range(tg.num_tasks)
        ]
    return Workload(
        seconds=seconds, wait=list(tg.wait), signal=list(tg.signal), worker=list(tg.worker),
        kernel=list(tg.op), num_triggers=list(tg.num_triggers), workers=target.workers, labels=labels,
        prefetch=prefetch,
    )


@dataclass(frozen=True)
class MemoryFloor:
    """The bytes one iteration must read from HBM and the time they take at peak bandwidth."""

    weight_bytes: int
    kv_bytes: int
    bandwidth: float   # bytes/s

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def seconds(self) -> float:
        return self.total_bytes / self.bandwidth


def memory_floor(tg: TaskGraph, tensors: dict[str, TensorSpec], context: int, bandwidth: float) -> MemoryFloor:
    """Count every weight once, except the lookup tables that specs list in
    ``gathered_weights`` (embeddings, rope tables), read one row per token. Add the KV slots
    that ops read through ``kv_cache_roles``: ``context`` filled slots and the iteration's
    own rows, for every layer's k and v cache.
    """
    tokens = tg.graph.tokens
    weights: dict[str, int] = {}
    kv = 0
    for op in tg.graph.ops:
        op_spec = spec_of(op.kind)
        for role, name in op.inputs.items():
            spec = tensors[name]
            if spec.kind is TensorKind.WEIGHT:
                row_bytes = spec.nbytes // spec.shape[0]
                gathered = min(tokens, spec.shape[0]) * row_bytes
                weights[name] = max(weights.get(name, 0), gathered if role in op_spec.gathered_weights else spec.nbytes)
        for role in op_spec.kv_cache_roles:
            cache = tensors[op.inputs.get(role) or op.outputs[role]]
            slots = min(context + tokens, cache.shape[0])
            kv += slots * (cache.nbytes // cache.shape[0])
    return MemoryFloor(sum(weights.values()), kv, bandwidth)
