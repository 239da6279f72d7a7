"""Operators of sentence encoders: bidirectional attention within each sentence of a
packed batch, and mean pooling of each sentence's rows.

An encoder iteration packs the rows of several sentences one after another. The inputs
``segments`` ([T]: the sentence of each row, negative for padding rows) and ``spans``
([B, 2]: the first row and one past the last row of each sentence, equal for an unused
slot) describe the packing. Both are runtime values, so a task that reads keys or
pooled rows declares access to all rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.errors import GraphError
from mpk.ir.tensor import DTYPE_BYTES, TensorSpec
from mpk.ops.base import Access, Cost, IndexBound, KernelArgs, Op, OpSpec, Tile, TilingPlan, cpp_float, expect_rank, expect_shape, register, task_call
from mpk.ops.norm import check_qkv, group_column_args, group_columns, head_layout
from mpk.ops.tiling import split

# Rows a sentence is assumed to have when the cost model sizes an attention task.
TYPICAL_SENTENCE_ROWS = 32


def check_packing(op: Op, tensors: dict[str, TensorSpec], rows: int) -> TensorSpec:
    """Check the shapes of ``segments`` ([rows]) and ``spans`` ([B, 2]); return spans."""
    if "segments" in op.inputs:
        expect_shape(op, "segments", tensors[op.inputs["segments"]], (rows,))
    spans = tensors[op.inputs["spans"]]
    expect_rank(op, "spans", spans, 2)
    expect_shape(op, "spans", spans, (spans.shape[0], 2))
    for role in ("segments", "spans"):
        if role in op.inputs and tensors[op.inputs[role]].dtype != "int64":
            raise GraphError(f"operator {op.name!r} ({op.kind}): {role} must be int64, got {tensors[op.inputs[role]].dtype}")
    return spans


@register
class SegmentAttentionSpec(OpSpec):
    kind = "segment_attention"
    doc = (
        "Bidirectional attention of each row's q heads over the k and v rows of its own sentence in "
        "a packed batch: row t attends to rows spans[segments[t]] of the same qkv tensor (grouped "
        "query heads allowed). Rows with a negative segment get zeros. Tiled by KV group and row blocks."
    )
    inputs = ("qkv", "segments", "spans")
    outputs = ("out",)
    attributes = ("num_heads", "num_kv_heads", "head_dim", "scale")
    cpu_kernel = "segment_attention_task"
    cuda_kernel = "segment_attention_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        qkv = check_qkv(op, tensors)
        heads, _, head_dim = head_layout(op)
        check_packing(op, tensors, qkv.shape[0])
        op.attrs.setdefault("scale", head_dim ** -0.5)
        return {"out": ((qkv.shape[0], heads * head_dim), None)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        rows = tensors[op.inputs["qkv"]].shape[0]
        return {"segments": IndexBound(None, tensors[op.inputs["spans"]].shape[0], "sentence slots"),
                "spans": IndexBound(0, rows + 1, "row boundaries")}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        kv_heads = op.attrs["num_kv_heads"]
        row_blocks = split(tensors[op.inputs["qkv"]].shape[0], max(1, plan.workers // kv_heads))
        return [(g, r0, r1) for g in range(kv_heads) for r0, r1 in row_blocks]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        group, r0, r1 = tile
        rows = tensors[op.inputs["qkv"]].shape[0]
        sentences = tensors[op.inputs["spans"]].shape[0]
        q, k, v = group_columns(op, group)
        return [
            Access("qkv", ((r0, r1), q), False),
            Access("qkv", ((0, rows), k), False),
            Access("qkv", ((0, rows), v), False),
            Access("segments", ((r0, r1),), False),
            Access("spans", ((0, sentences), (0, 2)), False),
            Access("out", ((r0, r1), q), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        group, r0, r1 = tile
        heads, kv_heads, head_dim = head_layout(op)
        element = DTYPE_BYTES[tensors[op.inputs["qkv"]].dtype]
        # NOTE: sentence lengths are runtime values; the estimate assumes typical ones.
        span = min(TYPICAL_SENTENCE_ROWS, tensors[op.inputs["qkv"]].shape[0])
        group_heads = heads // kv_heads
        moved = (r1 - r0) * head_dim * element * (2 * group_heads + 2)
        return Cost(moved, 4 * (r1 - r0) * span * group_heads * head_dim)

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        rows, row = tensors[op.inputs["qkv"]].shape
        out_cols = tensors[op.outputs["out"]].shape[1]
        pointers = [arg.pointer(role) for role in ("qkv", "segments", "spans", "out")]
        return task_call(backend, "segment_attention_task", [rows, row, op.attrs["head_dim"], out_cols],
                         [*pointers, cpp_float(op.attrs["scale"]), "tile[1]", "tile[2]", *group_column_args(op)])

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        group, r0, r1 = tile
        head_dim, scale = op.attrs["head_dim"], op.attrs["scale"]
        q_cols, k_cols, v_cols = group_columns(op, group)
        qkv, out = bufs["qkv"], bufs["out"]
        segments = bufs["segments"][r0:r1]
        out[r0:r1, q_cols[0] : q_cols[1]] = 0
        for sentence in torch.unique(segments[segments >= 0]).tolist():
            rows = torch.nonzero(segments == sentence).flatten() + r0
            start, end = (int(v) for v in bufs["spans"][sentence])
            q = qkv[rows, q_cols[0] : q_cols[1]].reshape(len(rows), -1, head_dim).transpose(0, 1)
            keys = qkv[start:end, k_cols[0] : k_cols[1]]
            values = qkv[start:end, v_cols[0] : v_cols[1]]
            weights = torch.softmax((q @ keys.T) * scale, dim=-1)
            out[rows, q_cols[0] : q_cols[1]] = (weights @ values).transpose(0, 1).reshape(len(rows), -1)


@register
class MeanPoolSpec(OpSpec):
    kind = "mean_pool"
    doc = (
        "out[b] = mean of rows spans[b] of x (zeros for an empty span), then, with `normalize`, "
        "divided by max(L2 norm, 1e-12) as sentence-transformers' Normalize does. Tiled over sentences."
    )
    inputs = ("x", "spans")
    outputs = ("out",)
    attributes = ("normalize",)
    cpu_kernel = "mean_pool_task"
    cuda_kernel = "mean_pool_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        x = tensors[op.inputs["x"]]
        expect_rank(op, "x", x, 2)
        spans = check_packing(op, tensors, x.shape[0])
        op.attrs.setdefault("normalize", True)
        return {"out": ((spans.shape[0], x.shape[1]), None)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return {"spans": IndexBound(0, tensors[op.inputs["x"]].shape[0] + 1, "row boundaries")}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return split(tensors[op.inputs["spans"]].shape[0], plan.workers)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        b0, b1 = tile
        rows, hidden = tensors[op.inputs["x"]].shape
        return [
            Access("x", ((0, rows), (0, hidden)), False),
            Access("spans", ((b0, b1), (0, 2)), False),
            Access("out", ((b0, b1), (0, hidden)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        b0, b1 = tile
        rows, hidden = tensors[op.inputs["x"]].shape
        sentences = tensors[op.inputs["spans"]].shape[0]
        # The tile reads its own sentences' rows: on average its share of all rows.
        read = rows * (b1 - b0) // sentences
        element = DTYPE_BYTES[tensors[op.inputs["x"]].dtype]
        return Cost((read + b1 - b0) * hidden * element, (read + 3 * (b1 - b0)) * hidden)

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        template = [tensors[op.inputs["x"]].shape[1], str(bool(op.attrs["normalize"])).lower()]
        return task_call(backend, "mean_pool_task", template,
                         [arg.pointer("x"), arg.pointer("spans"), arg.pointer("out"), "tile[0]", "tile[1]"])

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        b0, b1 = tile
        x, out = bufs["x"], bufs["out"]
        for b in range(b0, b1):
            start, end = (int(v) for v in bufs["spans"][b])
            if end <= start:
                out[b] = 0
                continue
            # The float sum over the rows divided by their count, as sentence-transformers'
            # Pooling computes it (its clamp of the count to 1e-9 never applies to a non-empty span).
            pooled = x[start:end].sum(dim=0) / (end - start)
            out[b] = F.normalize(pooled, p=2, dim=0) if op.attrs["normalize"] else pooled
