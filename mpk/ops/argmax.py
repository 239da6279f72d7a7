"""Greedy sampling in two steps: per-chunk maxima of the logits, then the max of the maxima.

Splitting lets the argmax over a large vocabulary run on many workers, each right after
the lm_head tile that produces its chunk. Ties go to the lowest token id, as torch.argmax.
"""

from __future__ import annotations

import math

import torch

from mpk.ir.tensor import TensorSpec
from mpk.ops.base import Access, KernelArgs, Op, OpSpec, Tile, TilingPlan, attr, expect_rank, expect_shape, register


@register
class ArgmaxPartialSpec(OpSpec):
    kind = "argmax_partial"
    doc = "Max value and its index for each chunk of `chunk` logits. One task per chunk."
    inputs = ("logits",)
    outputs = ("values", "indices")
    attributes = ("chunk",)
    cpu_kernel = "argmax_partial_task"
    cuda_kernel = "argmax_partial_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        logits = tensors[op.inputs["logits"]]
        expect_rank(op, "logits", logits, 2)
        parts = math.ceil(logits.shape[1] / attr(op, "chunk"))
        shape = (logits.shape[0], parts)
        return {"values": (shape, "float32"), "indices": (shape, "int64")}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(p,) for p in range(tensors[op.outputs["values"]].shape[1])]

    def _columns(self, op: Op, tensors: dict[str, TensorSpec], part: int) -> tuple[int, int]:
        vocab = tensors[op.inputs["logits"]].shape[1]
        chunk = op.attrs["chunk"]
        return part * chunk, min((part + 1) * chunk, vocab)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        (part,) = tile
        rows = (0, tensors[op.inputs["logits"]].shape[0])
        slot = (rows, (part, part + 1))
        return [
            Access("logits", (rows, self._columns(op, tensors, part)), False),
            Access("values", slot, True),
            Access("indices", slot, True),
        ]

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, vocab = tensors[op.inputs["logits"]].shape
        parts = tensors[op.outputs["values"]].shape[1]
        return (f"mpk::cpu::argmax_partial_task<{tokens}, {vocab}, {parts}, {op.attrs['chunk']}>({arg.pointer('logits')}, "
                f"{arg.pointer('values')}, {arg.pointer('indices')}, tile[0]);")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, vocab = tensors[op.inputs["logits"]].shape
        parts = tensors[op.outputs["values"]].shape[1]
        return (f"mpk::cuda::argmax_partial_task<{tokens}, {vocab}, {parts}, {op.attrs['chunk']}>({arg.pointer('logits')}, "
                f"{arg.pointer('values')}, {arg.pointer('indices')}, tile[0], smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        (part,) = tile
        chunk = op.attrs["chunk"]
        logits = bufs["logits"][:, part * chunk : (part + 1) * chunk]
        indices = logits.argmax(dim=1)
        values = logits.gather(1, indices[:, None]).squeeze(1)
        bufs["values"][:, part] = values.to(bufs["values"].dtype)
        bufs["indices"][:, part] = indices + part * chunk


@register
class ArgmaxReduceSpec(OpSpec):
    kind = "argmax_reduce"
    doc = "Token id of the largest chunk maximum per row. One task."
    inputs = ("values", "indices")
    outputs = ("out",)
    cpu_kernel = "argmax_reduce_task"
    cuda_kernel = "argmax_reduce_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        values = tensors[op.inputs["values"]]
        expect_rank(op, "values", values, 2)
        expect_shape(op, "indices", tensors[op.inputs["indices"]], values.shape)
        return {"out": ((values.shape[0],), "int64")}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(0,)]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        rows, parts = tensors[op.inputs["values"]].shape
        whole = ((0, rows), (0, parts))
        return [Access("values", whole, False), Access("indices", whole, False), Access("out", ((0, rows),), True)]

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, parts = tensors[op.inputs["values"]].shape
        return f"mpk::cpu::argmax_reduce_task<{tokens}, {parts}>({arg.pointer('values')}, {arg.pointer('indices')}, {arg.pointer('out')});"

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, parts = tensors[op.inputs["values"]].shape
        return f"mpk::cuda::argmax_reduce_task<{tokens}, {parts}>({arg.pointer('values')}, {arg.pointer('indices')}, {arg.pointer('out')}, smem);"

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        # Chunks are in token order, so the first maximal chunk holds the lowest maximal id.
        best = bufs["values"].argmax(dim=1, keepdim=True)
        bufs["out"][:] = bufs["indices"].gather(1, best).squeeze(1)
