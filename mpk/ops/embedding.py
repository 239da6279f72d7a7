"""Token embedding lookup: out[t, :] = weight[tokens[t], :]."""

from __future__ import annotations

import torch

from mpk.ir.tensor import DTYPE_BYTES, TensorSpec
from mpk.ops.base import Access, Cost, KernelArgs, Op, OpSpec, Tile, TilingPlan, expect_rank, register
from mpk.ops.tiling import column_parts, split


@register
class EmbeddingSpec(OpSpec):
    kind = "embedding"
    doc = "Look up one row of the embedding table per token. Tiled over hidden columns."
    inputs = ("tokens", "weight")
    outputs = ("out",)
    cpu_kernel = "embedding_task"
    cuda_kernel = "embedding_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        tokens, weight = tensors[op.inputs["tokens"]], tensors[op.inputs["weight"]]
        expect_rank(op, "tokens", tokens, 1)
        expect_rank(op, "weight", weight, 2)
        return {"out": ((tokens.shape[0], weight.shape[1]), None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        hidden = tensors[op.outputs["out"]].shape[1]
        return split(hidden, column_parts(hidden, plan.workers, plan.min_columns))

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        c0, c1 = tile
        tokens = tensors[op.inputs["tokens"]].shape[0]
        vocab = tensors[op.inputs["weight"]].shape[0]
        # The rows read depend on the token ids, so the whole column band of the table counts.
        return [
            Access("tokens", ((0, tokens),), False),
            Access("weight", ((0, vocab), (c0, c1)), False),
            Access("out", ((0, tokens), (c0, c1)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        c0, c1 = tile
        tokens = tensors[op.inputs["tokens"]].shape[0]
        element_bytes = DTYPE_BYTES[tensors[op.inputs["weight"]].dtype] + DTYPE_BYTES[tensors[op.outputs["out"]].dtype]
        # Only the looked-up rows are read, not the whole band that accesses() declares.
        return Cost(tokens * ((c1 - c0) * element_bytes + 8), 0)

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, hidden = tensors[op.outputs["out"]].shape
        return (f"mpk::cpu::embedding_task<{tokens}, {hidden}, {arg.element('weight')}>("
                f"{arg.pointer('tokens')}, {arg.pointer('weight')}, {arg.pointer('out')}, tile[0], tile[1]);")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, hidden = tensors[op.outputs["out"]].shape
        return (f"mpk::cuda::embedding_task<{tokens}, {hidden}>({arg.pointer('tokens')}, {arg.pointer('weight')}, "
                f"{arg.pointer('out')}, tile[0], tile[1], smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        c0, c1 = tile
        bufs["out"][:, c0:c1] = bufs["weight"][bufs["tokens"], c0:c1].to(bufs["out"].dtype)
