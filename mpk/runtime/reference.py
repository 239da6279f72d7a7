"""The reference executor: runs a task graph task by task with torch.

Tasks run one at a time in a random order that the events allow (seeded), not in the
global order, so a dependency the events fail to express shows up as a wrong answer.
Activation and output buffers are filled with NaN (integers with -1) before every
iteration and the KV cache starts as NaN, so a task that reads a value nobody wrote
poisons the result instead of reading a stale one.
"""

from __future__ import annotations

import random

import torch

from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import MpkError, RuntimeStallError
from mpk.ir.tensor import TensorKind, TensorSpec
from mpk.ops import spec_of
from mpk.runtime.inputs import check_inputs, index_bounds

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def poison(tensor: torch.Tensor) -> None:
    tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def new_state(tg: TaskGraph, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Allocate the persistent state (KV caches) of a task graph, poisoned."""
    state = {}
    for spec in tg.placement.buffers.values():
        if spec.kind is TensorKind.STATE:
            state[spec.name] = torch.full(spec.shape, float("nan"), dtype=dtype)
    return state


class ReferenceExecutor:
    def __init__(self, tg: TaskGraph, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None, *,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        self.tg = tg
        self.rng = random.Random(seed)
        self.buffers: dict[str, torch.Tensor] = {}
        self.state = state if state is not None else new_state(tg, dtype)
        for name, spec in tg.placement.buffers.items():
            self.buffers[name] = self._allocate(spec, weights, dtype)
        self.bindings = [self._bind(op) for op in tg.graph.ops]
        self.consumers = [range(tg.first[e], tg.last[e]) for e in range(tg.num_events)]
        self.bounds = index_bounds(tg)

    def _allocate(self, spec: TensorSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if spec.kind is TensorKind.WEIGHT:
            if spec.name not in weights:
                raise MpkError(f"weight {spec.name!r} was not loaded; pass every weight of the graph")
            weight = weights[spec.name]
            if tuple(weight.shape) != spec.shape:
                raise MpkError(f"weight {spec.name!r} has shape {list(weight.shape)}, the graph expects {list(spec.shape)}")
            return weight.to(dtype)
        if spec.kind is TensorKind.STATE:
            return self.state[spec.name]
        torch_dtype = dtype if spec.dtype.startswith(("float", "bfloat")) else TORCH_DTYPES[spec.dtype]
        return torch.empty(spec.shape, dtype=torch_dtype)

    def _bind(self, op) -> dict[str, torch.Tensor]:
        home = self.tg.placement.home
        bound = {role: self.buffers[home[name]] for role, name in op.inputs.items()}
        bound.update({role: self.buffers[home[name]] for role, name in op.outputs.items()})
        return bound

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one iteration on ``inputs`` (by tensor name); return the outputs by name."""
        for spec in self.tg.placement.buffers.values():
            if spec.kind in (TensorKind.ACTIVATION, TensorKind.OUTPUT):
                poison(self.buffers[spec.name])
        self._write_inputs(inputs)
        self._execute()
        return {s.name: self.buffers[s.name].clone() for s in self.tg.placement.buffers.values() if s.kind is TensorKind.OUTPUT}

    def _write_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        for name, value in check_inputs(self.tg, inputs, self.bounds).items():
            self.buffers[name].copy_(value)

    def _execute(self) -> None:
        tg = self.tg
        pending = list(tg.num_triggers)
        ready = list(self.consumers[0])  # BEGIN fired: the host wrote the inputs
        done = 0
        while ready:
            pick = self.rng.randrange(len(ready))
            ready[pick], ready[-1] = ready[-1], ready[pick]
            task = ready.pop()
            if tg.op[task] >= 0:
                op = tg.graph.ops[tg.op[task]]
                spec_of(op.kind).run(op, tg.tile[task], self.bindings[tg.op[task]])
            done += 1
            event = tg.signal[task]
            pending[event] -= 1
            if pending[event] == 0 and event != tg.end:
                ready.extend(self.consumers[event])
        if done != tg.num_tasks or pending[tg.end] != 0:
            stuck = [f"event {e} ({pending[e]} of {tg.num_triggers[e]} triggers missing)" for e in range(1, tg.num_events) if pending[e] > 0]
            raise RuntimeStallError(f"execution stopped after {done} of {tg.num_tasks} tasks; stuck: {', '.join(stuck[:8])}")
