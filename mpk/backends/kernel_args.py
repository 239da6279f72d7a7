"""C++ expressions for an operator's tensors, shared by the CPU and CUDA code generators."""

from __future__ import annotations

from mpk.compiler.taskgraph import TaskGraph
from mpk.ops import Op
from mpk.ops.base import KernelArgs

CPP_TYPES = {"float32": "float", "bfloat16": "mpk::bf16", "int64": "int64_t"}
CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "int64": "int64_t"}


class BufferArgs(KernelArgs):
    """Pointers into the `buffers` table of a generated translation unit: the buffer index
    comes from the task graph's placement, the element type from ``dtypes`` (per buffer)
    through ``types`` (dtype name -> C++ type); ``panels`` names the weight buffers stored
    packed into panels.
    """

    def __init__(self, op: Op, tg: TaskGraph, dtypes: dict[str, str], types: dict[str, str], panels: frozenset[str] = frozenset()) -> None:
        self.op, self.tg, self.dtypes, self.types, self.panels = op, tg, dtypes, types, panels
        self.index = {name: i for i, name in enumerate(tg.placement.buffers)}

    def _buffer(self, role: str) -> str:
        name = self.op.inputs.get(role) or self.op.outputs[role]
        return self.tg.placement.home[name]

    def element(self, role: str) -> str:
        return self.types[self.dtypes[self._buffer(role)]]

    def packed(self, role: str) -> bool:
        return self._buffer(role) in self.panels

    def pointer(self, role: str) -> str:
        qualifier = "" if role in self.op.outputs else "const "
        return f"static_cast<{qualifier}{self.element(role)}*>(buffers[{self.index[self._buffer(role)]}])"
