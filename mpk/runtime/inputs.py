"""Checks of the host's inputs to one iteration, shared by every executor.

The kernels index embedding tables, KV caches and packed rows with input values
unchecked, so an out-of-range value must stop here, before it reads or writes outside a
buffer. Each operator spec says which of its inputs index what (OpSpec.index_bounds).
"""

from __future__ import annotations

import torch

from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import MpkError
from mpk.ir.tensor import TensorKind
from mpk.ops import spec_of
from mpk.ops.base import IndexBound


def index_bounds(tg: TaskGraph) -> dict[str, list[IndexBound]]:
    """Per input tensor, the bounds of every operator that indexes with it."""
    bounds: dict[str, list[IndexBound]] = {}
    for op in tg.graph.ops:
        for role, bound in spec_of(op.kind).index_bounds(op, tg.graph.tensors).items():
            found = bounds.setdefault(op.inputs[role], [])
            if bound not in found:
                found.append(bound)
    return bounds


def check_inputs(tg: TaskGraph, inputs: dict[str, torch.Tensor], bounds: dict[str, list[IndexBound]]) -> dict[str, torch.Tensor]:
    """Return the graph's inputs as tensors after checking presence, shape and index range."""
    checked = {}
    for spec in tg.graph.tensors_of(TensorKind.INPUT):
        if spec.name not in inputs:
            raise MpkError(f"missing input {spec.name!r} of shape {list(spec.shape)}")
        value = torch.as_tensor(inputs[spec.name])
        if tuple(value.shape) != spec.shape:
            raise MpkError(f"input {spec.name!r} has shape {list(value.shape)}, expected {list(spec.shape)}")
        if value.numel():
            low, high = int(value.min()), int(value.max())
            for bound in bounds.get(spec.name, ()):
                if (bound.lo is not None and low < bound.lo) or high >= bound.hi:
                    allowed = f"in {bound.lo}..{bound.hi - 1}" if bound.lo is not None else f"below {bound.hi} (negative marks padding)"
                    raise MpkError(f"input {spec.name!r} contains values {low}..{high}; they index {bound.indexes}, "
                                   f"so they must be {allowed}")
        checked[spec.name] = value
    return checked
