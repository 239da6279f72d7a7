"""Linear layer: out = act(x @ weight.T + bias), or x @ weight.T + bias + residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.errors import GraphError
from mpk.ir.tensor import TensorSpec
from mpk.ops.base import Access, Cost, KernelArgs, Op, OpSpec, Tile, TilingPlan, expect_rank, expect_shape, register

# Activations that linear applies to its output columns, by attribute value. "gelu" is
# the exact (erf) GELU of transformers' hidden_act "gelu".
ACTIVATIONS = ("none", "gelu")
from mpk.ops.tiling import column_parts, split_segments


def linear_tiles(segments: list[int], align: int, plan: TilingPlan, per_worker: int = 1) -> list[tuple[int, int]]:
    """Column tiles of a linear layer with these output segments, about ``per_worker``
    per worker. Operators that consume one segment tile by tile (silu_mul,
    argmax_partial) reuse it to line up with them.
    """
    parts = column_parts(sum(segments), plan.workers * per_worker, plan.min_columns)
    return split_segments(segments, parts, align)


@register
class LinearSpec(OpSpec):
    kind = "linear"
    doc = (
        "out = activation(x @ weight.T + bias), or x @ weight.T + bias + residual; bias and residual "
        "are optional, and `activation` is none or gelu (exact erf GELU, not with a residual). Tiled "
        "over output columns, so each task streams its own rows of the weight once. `segments` lists "
        "the widths of fused projections (q|k|v, gate|up): no tile crosses a segment boundary, and "
        "tile widths are multiples of `align`. `tiles_per_worker` (default 1) cuts finer tiles, which "
        "balance the workers better when each task is long (many rows)."
    )
    inputs = ("x", "weight")
    optional_inputs = ("bias", "residual")
    outputs = ("out",)
    inplace = {"out": "residual"}
    attributes = ("segments", "align", "activation", "tiles_per_worker")
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
        if "bias" in op.inputs:
            expect_shape(op, "bias", tensors[op.inputs["bias"]], (weight.shape[0],))
        activation = op.attrs.setdefault("activation", "none")
        if activation not in ACTIVATIONS:
            raise GraphError(f"operator {op.name!r} (linear): activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if activation != "none" and "residual" in op.inputs:
            raise GraphError(f"operator {op.name!r} (linear): activation {activation!r} with a residual is ambiguous; "
                             "add the residual in a separate linear without activation")
        return {"out": (out_shape, None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return linear_tiles(op.attrs["segments"], op.attrs["align"], plan, op.attrs.get("tiles_per_worker", 1))

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        c0, c1 = tile
        tokens, features = tensors[op.inputs["x"]].shape
        out = ((0, tokens), (c0, c1))
        found = [
            Access("x", ((0, tokens), (0, features)), False),
            Access("weight", ((c0, c1), (0, features)), False),
        ]
        if "bias" in op.inputs:
            found.append(Access("bias", ((c0, c1),), False))
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
        bias = arg.pointer("bias") if "bias" in op.inputs else f"static_cast<const {arg.element('weight')}*>(nullptr)"
        kernel = "linear_panels_task" if arg.packed("weight") else "linear_task"
        return (f"mpk::cpu::{kernel}<{tokens}, {features}, {columns}, {arg.element('weight')}, {str(residual).lower()}, "
                f"{_epilogue(op, 'cpu')}>({arg.pointer('x')}, {arg.pointer('weight')}, {bias}, "
                f"{arg.pointer('residual') if residual else 'nullptr'}, {arg.pointer('out')}, tile[0], tile[1]);")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, features = tensors[op.inputs["x"]].shape
        columns = tensors[op.inputs["weight"]].shape[0]
        residual = "residual" in op.inputs
        out = arg.element("out")
        # STAGED = true, because the megakernel runs cuda_prefetch's linear_prefetch on
        # the same CTA before every run of the task, with only the event wait in between.
        call = (f"mpk::cuda::linear_task<{tokens}, {features}, {columns}, {out}, {str(residual).lower()}, true>("
                f"{arg.pointer('x')}, {arg.pointer('weight')}, "
                f"{arg.pointer('residual') if residual else f'static_cast<const {out}*>(nullptr)'}, "
                f"{arg.pointer('out')}, tile[0], tile[1], smem);")
        if "bias" not in op.inputs and op.attrs.get("activation", "none") == "none":
            return call
        # NOTE: the bias is added after the residual here, while the reference adds it
        # before; in bf16 the two orders can round differently.
        bias = arg.pointer("bias") if "bias" in op.inputs else f"static_cast<const {arg.element('weight')}*>(nullptr)"
        # The epilogue pass reads what other threads of the CTA stored, hence the barrier.
        return (f"{call}\n      __syncthreads();\n      mpk::cuda::bias_activation_task<{tokens}, {columns}, "
                f"{_epilogue(op, 'cuda')}>({bias}, {arg.pointer('out')}, tile[0], tile[1]);")

    def cuda_prefetch(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        tokens, features = tensors[op.inputs["x"]].shape
        return (f"mpk::cuda::linear_prefetch<{tokens}, {features}>({arg.pointer('weight')}, tile[0], tile[1], "
                f"smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        c0, c1 = tile
        x = bufs["x"]
        result = x @ bufs["weight"][c0:c1].to(x.dtype).T
        if "bias" in bufs:
            result = result + bufs["bias"][c0:c1].to(x.dtype)
        if op.attrs.get("activation", "none") == "gelu":
            result = F.gelu(result)
        if "residual" in bufs:
            result = result + bufs["residual"][:, c0:c1]
        bufs["out"][:, c0:c1] = result


def _epilogue(op: Op, backend: str) -> str:
    """Return the C++ name of a linear's epilogue: its activation, applied after the bias."""
    activation = op.attrs.get("activation", "none")
    return f"mpk::{backend}::Activation::{activation}"
