"""Linear layer without bias: out = x @ weight.T, optionally plus a residual."""

from __future__ import annotations

import torch

from mpk.errors import GraphError
from mpk.ir.tensor import TensorSpec
from mpk.ops.base import Access, Cost, KernelArgs, Op, OpSpec, Tile, TilingPlan, expect_rank, expect_shape, register
from mpk.ops.tiling import column_parts, split_segments


def linear_tiles(segments: list[int], align: int, plan: TilingPlan) -> list[tuple[int, int]]:
    """Column tiles of a linear layer with these output segments. Operators that consume
    one segment tile by tile (silu_mul, argmax_partial) reuse it to line up with them.
    """
    parts = column_parts(sum(segments), plan.workers, plan.min_columns)
    return split_segments(segments, parts, align)


@register
class LinearSpec(OpSpec):
    kind = "linear"
    doc = (
        "out = x @ weight.T (+ residual). Tiled over output columns, so each task streams its own "
        "rows of the weight once. `segments` lists the widths of fused projections (q|k|v, gate|up): "
        "no tile crosses a segment boundary, and tile widths are multiples of `align`."
    )
    inputs = ("x", "weight")
    optional_inputs = ("residual",)
    outputs = ("out",)
    inplace = {"out": "residual"}
    attributes = ("segments", "align")
    cpu_kernel = "linear_task"
    cuda_kernel = "linear_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        x, weight = tensors[op.inputs["x"]], tensors[op.inputs["weight"]]
        expect_rank(op, "x", x, 2)
        expect_rank(op, "weight", weight, 2)
        if weight.shape[1] != x.shape[1]:
            raise GraphError(
                f"operator {op.name!r} (linear): weight {weight.name!r} has {weight.shape[1]} input features "
                f"but x {x.name!r} has {x.shape[1]}"
            )
        out_shape = (x.shape[0], weight.shape[0])
        segments = op.attrs.setdefault("segments", [weight.shape[0]])
        op.attrs.setdefault("align", 1)
        if sum(segments) != weight.shape[0]:
            raise GraphError(f"operator {op.name!r} (linear): segments {segments} do not sum to {weight.shape[0]} rows")
        if "residual" in op.inputs:
            expect_shape(op, "residual", tensors[op.inputs["residual"]], out_shape)
        return {"out": (out_shape, None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return linear_tiles(op.attrs["segments"], op.attrs["align"], plan)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        c0, c1 = tile
        tokens, features = tensors[op.inputs["x"]].shape
        out = ((0, tokens), (c0, c1))
        found = [
            Access("x", ((0, tokens), (0, features)), False),
            Access("weight", ((c0, c1), (0, features)), False),
        ]
        if "residual" in op.inputs:
            found.append(Access("residual", out, False))
        found.append(Access("out", out, True))
        return found

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        c0, c1 = tile
        tokens, features = tensors[op.inputs["x"]].shape
        moved = super().cost(op, tensors, tile)
        return Cost(moved.bytes, 2 * tokens * features * (c1 - c0))

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, features = tensors[op.inputs["x"]].shape
        columns = tensors[op.inputs["weight"]].shape[0]
        residual = "residual" in op.inputs
        return (f"mpk::cpu::linear_task<{tokens}, {features}, {columns}, {arg.element('weight')}, {str(residual).lower()}>("
                f"{arg.pointer('x')}, {arg.pointer('weight')}, {arg.pointer('residual') if residual else 'nullptr'}, "
                f"{arg.pointer('out')}, tile[0], tile[1]);")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, features = tensors[op.inputs["x"]].shape
        columns = tensors[op.inputs["weight"]].shape[0]
        residual = "residual" in op.inputs
        out = arg.element("out")
        # STAGED = true, because the megakernel runs cuda_prefetch's linear_prefetch on
        # the same CTA before every run of the task, with only the event wait in between.
        return (f"mpk::cuda::linear_task<{tokens}, {features}, {columns}, {out}, {str(residual).lower()}, true>("
                f"{arg.pointer('x')}, {arg.pointer('weight')}, "
                f"{arg.pointer('residual') if residual else f'static_cast<const {out}*>(nullptr)'}, "
                f"{arg.pointer('out')}, tile[0], tile[1], smem);")

    def cuda_prefetch(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, features = tensors[op.inputs["x"]].shape
        return (f"mpk::cuda::linear_prefetch<{tokens}, {features}>({arg.pointer('weight')}, tile[0], tile[1], "
                f"smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        c0, c1 = tile
        x = bufs["x"]
        result = x @ bufs["weight"][c0:c1].to(x.dtype).T
        if "residual" in bufs:
            result = result + bufs["residual"][:, c0:c1]
        bufs["out"][:, c0:c1] = result
