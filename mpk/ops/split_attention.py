"""Decode attention split over the KV cache (flash-decoding), for long caches on many SMs.

There is one task per KV group and chunk of cache slots. It normalizes and rotates the
group's q and k heads, and appends k and v to the cache when the row's position falls in
its chunk. Then it attends over its chunk's slots up to the position. It writes a partial result per q
head: the softmax-weighted average of the values (acc), the max score m and the sum of
exp(score - m), l. One combine task per group then merges the chunks:
out = sum_c w_c acc_c / sum_c w_c with w_c = l_c exp(m_c - max_c m_c).

Partials are [T, chunks, num_heads, head_dim + 2]: acc, then m, then l.
"""

from __future__ import annotations

import math

import torch

from mpk.errors import GraphError
from mpk.ir.tensor import DTYPE_BYTES, TensorSpec
from mpk.ops.attention import check_cache, rotary_bounds, rotate
from mpk.ops.base import Access, Cost, IndexBound, KernelArgs, Op, OpSpec, Tile, TilingPlan, attr, cpp_float, expect_rank, expect_shape, register, task_call
from mpk.ops.norm import check_qkv, group_column_args, group_columns, head_layout, qk_norm_pointer_args, rms_normalize


def chunk_bounds(slots: int, chunks: int, chunk: int) -> tuple[int, int]:
    """Cache slots [lo, hi) of one chunk: chunks of ceil(slots / chunks), the last shorter."""
    size = -(-slots // chunks)
    lo = min(chunk * size, slots)
    return lo, min(lo + size, slots)


@register
class SplitAttentionSpec(OpSpec):
    kind = "split_attention"
    doc = (
        "Decode attention split over the KV cache, one task per KV group and chunk of `chunks` cache "
        "slots. Each task applies q/k norm (when q_weight and k_weight are bound) and rope, appends "
        "k and v of the rows whose position falls in its chunk, and attends over the chunk's slots "
        "up to each row's position. It writes partials (acc, max, sum) that attention_combine merges."
    )
    inputs = ("qkv", "positions", "cos", "sin")
    optional_inputs = ("q_weight", "k_weight")
    outputs = ("partials", "k_cache", "v_cache")
    attributes = ("num_heads", "num_kv_heads", "head_dim", "scale", "eps", "chunks", "context")
    gathered_weights = ("cos", "sin")
    kv_cache_roles = ("k_cache", "v_cache")
    cpu_kernel = "split_attention_task"
    cuda_kernel = "split_attention_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        heads, _, head_dim = head_layout(op)
        qkv = check_qkv(op, tensors)
        chunks = attr(op, "chunks")
        if ("q_weight" in op.inputs) != ("k_weight" in op.inputs):
            raise GraphError(f"operator {op.name!r} (split_attention): bind both q_weight and k_weight, or neither")
        for role in ("q_weight", "k_weight"):
            if role in op.inputs:
                expect_shape(op, role, tensors[op.inputs[role]], (head_dim,))
        expect_shape(op, "positions", tensors[op.inputs["positions"]], (qkv.shape[0],))
        cos = tensors[op.inputs["cos"]]
        expect_rank(op, "cos", cos, 2)
        expect_shape(op, "sin", tensors[op.inputs["sin"]], cos.shape)
        cache = check_cache(op, tensors, "k_cache")
        check_cache(op, tensors, "v_cache")
        if not 1 <= chunks <= cache.shape[0]:
            raise GraphError(f"operator {op.name!r} (split_attention): chunks={chunks} must be in 1..{cache.shape[0]} (the cache slots)")
        op.attrs.setdefault("scale", 1.0 / math.sqrt(head_dim))
        op.attrs.setdefault("eps", 1e-6)
        return {"partials": ((qkv.shape[0], chunks, heads, head_dim + 2), "float32")}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return rotary_bounds(op, tensors)

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(g, c) for g in range(op.attrs["num_kv_heads"]) for c in range(op.attrs["chunks"])]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        group, chunk = tile
        heads, kv_heads, head_dim = head_layout(op)
        rows = tensors[op.inputs["qkv"]].shape[0]
        slots = tensors[op.outputs["k_cache"]].shape[0]
        lo, hi = chunk_bounds(slots, op.attrs["chunks"], chunk)
        q, k, v = group_columns(op, group)
        table = tensors[op.inputs["cos"]].shape
        group_heads = heads // kv_heads
        slab = ((lo, hi), (group, group + 1), (0, head_dim))
        found = [Access("qkv", ((0, rows), cols), False) for cols in (q, k, v)]
        found += [Access("positions", ((0, rows),), False), Access("cos", ((0, table[0]), (0, table[1])), False),
                  Access("sin", ((0, table[0]), (0, table[1])), False)]
        found += [Access(role, ((0, head_dim),), False) for role in ("q_weight", "k_weight") if role in op.inputs]
        if hi > lo:
            found += [Access("k_cache", slab, False), Access("v_cache", slab, False),
                      Access("k_cache", slab, True), Access("v_cache", slab, True)]
        heads_box = (group * group_heads, (group + 1) * group_heads)
        found.append(Access("partials", ((0, rows), (chunk, chunk + 1), heads_box, (0, head_dim + 2)), True))
        return found

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        group, chunk = tile
        heads, kv_heads, head_dim = head_layout(op)
        rows = tensors[op.inputs["qkv"]].shape[0]
        slots = tensors[op.outputs["k_cache"]].shape[0]
        lo, hi = chunk_bounds(slots, op.attrs["chunks"], chunk)
        # Filled slots of this chunk: with a context, the slots below it; without, half.
        filled = min(op.attrs["context"] + rows, slots) if "context" in op.attrs else slots // 2
        read = max(0, min(hi, filled) - lo)
        group_heads = heads // kv_heads
        cache_bytes = 2 * read * head_dim * DTYPE_BYTES[tensors[op.outputs["k_cache"]].dtype]
        row_bytes = rows * (group_heads + 2) * head_dim * DTYPE_BYTES[tensors[op.inputs["qkv"]].dtype]
        partial_bytes = rows * group_heads * (head_dim + 2) * 4
        return Cost(cache_bytes + row_bytes + partial_bytes, 4 * rows * read * group_heads * head_dim)

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        slots = tensors[op.outputs["k_cache"]].shape[0]
        template = [tokens, row, head_dim, kv_heads, slots, op.attrs["chunks"], heads, str("q_weight" in op.inputs).lower()]
        arguments = [arg.pointer("qkv"), arg.pointer("positions"), arg.pointer("cos"), arg.pointer("sin"),
                     *qk_norm_pointer_args(op, arg), cpp_float(op.attrs["eps"]), arg.pointer("k_cache"),
                     arg.pointer("v_cache"), arg.pointer("partials"), cpp_float(op.attrs["scale"]), "tile[0]", "tile[1]",
                     *group_column_args(op)]
        return task_call(backend, "split_attention_task", template, arguments)

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        group, chunk = tile
        heads, kv_heads, head_dim = head_layout(op)
        qkv, partials = bufs["qkv"], bufs["partials"]
        k_cache, v_cache = bufs["k_cache"], bufs["v_cache"]
        slots = k_cache.shape[0]
        lo, hi = chunk_bounds(slots, op.attrs["chunks"], chunk)
        q_cols, k_cols, v_cols = group_columns(op, group)
        group_heads = heads // kv_heads
        head_rows = slice(group * group_heads, (group + 1) * group_heads)
        rotated = []

        # First every row's append, then attention: a row may attend to a slot that a
        # later row of the same iteration appends.
        for t in range(qkv.shape[0]):
            p = int(bufs["positions"][t])
            if not 0 <= p < slots:
                rotated.append(None)
                continue
            q = qkv[t, q_cols[0] : q_cols[1]].reshape(group_heads, head_dim)
            k = qkv[t, k_cols[0] : k_cols[1]].reshape(1, head_dim)
            if "q_weight" in bufs:
                q = rms_normalize(q, bufs["q_weight"], op.attrs["eps"])
                k = rms_normalize(k, bufs["k_weight"], op.attrs["eps"])
            cos, sin = bufs["cos"][p : p + 1].to(q.dtype), bufs["sin"][p : p + 1].to(q.dtype)
            q, k = rotate(q[None], cos, sin)[0], rotate(k[None], cos, sin)[0]
            if lo <= p < hi:
                k_cache[p, group] = k[0].to(k_cache.dtype)
                v_cache[p, group] = qkv[t, v_cols[0] : v_cols[1]].to(v_cache.dtype)
            rotated.append((p, q))

        for t, entry in enumerate(rotated):
            partials[t, chunk, head_rows] = 0
            partials[t, chunk, head_rows, head_dim] = -math.inf
            if entry is None or min(hi, entry[0] + 1) <= lo:
                continue
            p, q = entry
            end = min(hi, p + 1)
            # Slice, never mask: slots past the position may hold NaN.
            keys, values = k_cache[lo:end, group].to(q.dtype), v_cache[lo:end, group].to(q.dtype)
            scores = (q @ keys.T) * op.attrs["scale"]
            peak = scores.max(dim=-1, keepdim=True).values
            weights = torch.exp(scores - peak)
            total = weights.sum(dim=-1, keepdim=True)
            partials[t, chunk, head_rows, :head_dim] = ((weights / total) @ values).to(partials.dtype)
            partials[t, chunk, head_rows, head_dim] = peak[:, 0].to(partials.dtype)
            partials[t, chunk, head_rows, head_dim + 1] = total[:, 0].to(partials.dtype)


@register
class AttentionCombineSpec(OpSpec):
    kind = "attention_combine"
    doc = (
        "Merge split_attention's partials of one KV group's q heads into the attention output: "
        "out = sum_c w_c acc_c / sum_c w_c with w_c = l_c exp(m_c - max m). Rows whose chunks are all "
        "empty (padding rows) get zeros."
    )
    inputs = ("partials",)
    outputs = ("out",)
    attributes = ("num_heads", "num_kv_heads", "head_dim")
    cpu_kernel = "attention_combine_task"
    cuda_kernel = "attention_combine_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        heads, _, head_dim = head_layout(op)
        partials = tensors[op.inputs["partials"]]
        expect_rank(op, "partials", partials, 4)
        expect_shape(op, "partials", partials, (partials.shape[0], partials.shape[1], heads, head_dim + 2))
        return {"out": ((partials.shape[0], heads * head_dim), None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(g,) for g in range(op.attrs["num_kv_heads"])]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        (group,) = tile
        heads, kv_heads, head_dim = head_layout(op)
        rows, chunks = tensors[op.inputs["partials"]].shape[:2]
        group_heads = heads // kv_heads
        heads_box = (group * group_heads, (group + 1) * group_heads)
        return [
            Access("partials", ((0, rows), (0, chunks), heads_box, (0, head_dim + 2)), False),
            Access("out", ((0, rows), (heads_box[0] * head_dim, heads_box[1] * head_dim)), True),
        ]

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        rows, chunks = tensors[op.inputs["partials"]].shape[:2]
        group_heads = heads // kv_heads
        template = [rows, chunks, heads, head_dim]
        return task_call(backend, "attention_combine_task", template,
                         [arg.pointer("partials"), arg.pointer("out"), f"tile[0] * {group_heads}", f"(tile[0] + 1) * {group_heads}"])

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        (group,) = tile
        heads, kv_heads, head_dim = head_layout(op)
        group_heads = heads // kv_heads
        parts = bufs["partials"][:, :, group * group_heads : (group + 1) * group_heads]  # [T, C, gh, HD + 2]
        acc, peak, total = parts[..., :head_dim], parts[..., head_dim], parts[..., head_dim + 1]
        top = peak.max(dim=1, keepdim=True).values
        weights = torch.where(torch.isinf(peak), torch.zeros_like(total), total * torch.exp(peak - top))
        norm = weights.sum(dim=1)  # [T, gh]
        merged = (weights[..., None] * acc).sum(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm))[..., None]
        out = bufs["out"]
        out[:, group * group_heads * head_dim : (group + 1) * group_heads * head_dim] = merged.reshape(merged.shape[0], -1).to(out.dtype)
