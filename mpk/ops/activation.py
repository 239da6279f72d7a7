"""SwiGLU activation of a fused gate/up projection: out = silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.errors import GraphError
from mpk.ir.tensor import TensorSpec
from mpk.ops.base import Access, Cost, KernelArgs, Op, OpSpec, Tile, TilingPlan, expect_rank, register
from mpk.ops.linear import linear_tiles


@register
class SiluMulSpec(OpSpec):
    kind = "silu_mul"
    doc = "out = silu(gate) * up, where gate_up rows are [gate | up]. Tiled over output columns."
    inputs = ("gate_up",)
    outputs = ("out",)
    attributes = ("align",)
    cpu_kernel = "silu_mul_task"
    cuda_kernel = "silu_mul_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        gate_up = tensors[op.inputs["gate_up"]]
        expect_rank(op, "gate_up", gate_up, 2)
        if gate_up.shape[1] % 2:
            raise GraphError(f"operator {op.name!r} (silu_mul): gate_up width {gate_up.shape[1]} is odd")
        return {"out": ((gate_up.shape[0], gate_up.shape[1] // 2), None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        # The same tiles as the gate half of the gate/up projection, so that each task
        # waits for exactly one gate tile and one up tile.
        width = tensors[op.outputs["out"]].shape[1]
        return [tile for tile in linear_tiles([width, width], op.attrs.get("align", 1), plan) if tile[1] <= width]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        c0, c1 = tile
        tokens, width = tensors[op.outputs["out"]].shape
        rows = (0, tokens)
        return [
            Access("gate_up", (rows, (c0, c1)), False),
            Access("gate_up", (rows, (width + c0, width + c1)), False),
            Access("out", (rows, (c0, c1)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        c0, c1 = tile
        tokens = tensors[op.outputs["out"]].shape[0]
        return Cost(super().cost(op, tensors, tile).bytes, 6 * tokens * (c1 - c0))

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, width = tensors[op.outputs["out"]].shape
        return f"mpk::cpu::silu_mul_task<{tokens}, {width}>({arg.pointer('gate_up')}, {arg.pointer('out')}, tile[0], tile[1]);"

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, width = tensors[op.outputs["out"]].shape
        return f"mpk::cuda::silu_mul_task<{tokens}, {width}>({arg.pointer('gate_up')}, {arg.pointer('out')}, tile[0], tile[1], smem);"

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        c0, c1 = tile
        width = bufs["out"].shape[1]
        gate_up = bufs["gate_up"]
        bufs["out"][:, c0:c1] = F.silu(gate_up[:, c0:c1]) * gate_up[:, width + c0 : width + c1]
