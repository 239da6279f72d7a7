"""Memory planning: activations whose lifetimes do not overlap share one buffer.

Sharing is what makes write-after-read hazards real: a buffer that one operator
still reads may be the next operator's output, so the dependency analysis works on
these physical buffers, not on the logical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorKind, TensorSpec


@dataclass
class Placement:
    buffers: dict[str, TensorSpec]   # physical buffers by name
    home: dict[str, str]             # logical tensor -> physical buffer


def plan_memory(graph: OpGraph, share: bool = True) -> Placement:
    """Give every tensor a physical buffer. Only activations of equal shape and dtype
    share; inputs, outputs, weights and state keep their own memory.
    """
    last_use = _last_uses(graph)
    buffers: dict[str, TensorSpec] = {}
    home: dict[str, str] = {}
    free: list[str] = []

    for name, spec in graph.tensors.items():
        if spec.kind is not TensorKind.ACTIVATION:
            buffers[name] = spec
            home[name] = name

    for index, op in enumerate(graph.ops):
        # Buffers freed by earlier operators only: this operator's inputs are still live.
        for name in op.tensor_names():
            if name in home:
                continue
            spec = graph.tensors[name]
            reused = next((b for b in free if share and _fits(buffers[b], spec)), None)
            if reused is None:
                reused = f"act.{sum(1 for b in buffers.values() if b.kind is TensorKind.ACTIVATION)}"
                buffers[reused] = TensorSpec(reused, spec.shape, spec.dtype, TensorKind.ACTIVATION)
            else:
                free.remove(reused)
            home[name] = reused
        for name in dict.fromkeys(op.tensor_names()):
            if graph.tensors[name].kind is TensorKind.ACTIVATION and last_use[name] == index:
                free.append(home[name])
    return Placement(buffers, home)


def _fits(buffer: TensorSpec, tensor: TensorSpec) -> bool:
    return buffer.shape == tensor.shape and buffer.dtype == tensor.dtype


def _last_uses(graph: OpGraph) -> dict[str, int]:
    last: dict[str, int] = {}
    for index, op in enumerate(graph.ops):
        for name in op.tensor_names():
            last[name] = index
    return last
