"""Rotary embedding with the KV-cache append, causal attention over the KV cache, and the
two fused with q/k norm into one task per KV group.

Row t of an iteration is the token at ``positions[t]``; a negative position marks a
padding row (a prompt chunk shorter than the compiled chunk), which writes nothing to
the cache and produces zeros. The cache of one layer is [max_seq_len, kv_heads, head_dim].
"""

from __future__ import annotations

import math

import torch

from mpk.errors import GraphError
from mpk.ir.tensor import DTYPE_BYTES, TensorSpec
from mpk.ops.base import Access, Cost, IndexBound, KernelArgs, Op, OpSpec, cpp_float, Tile, TilingPlan, expect_rank, expect_shape, register, spec_of, task_call
from mpk.ops.norm import check_qkv, group_column_args, group_columns, head_layout, qk_norm_pointer_args
from mpk.ops.tiling import split


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding in the rotate-half layout. x: [T, heads, D]; cos, sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def element_bytes(tensors: dict[str, TensorSpec], name: str) -> int:
    return DTYPE_BYTES[tensors[name].dtype]


def rotary_bounds(op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
    """Positions index the KV cache slots and the rope tables; negative ones are padding."""
    slots = min(tensors[op.outputs["k_cache"]].shape[0], tensors[op.inputs["cos"]].shape[0])
    return {"positions": IndexBound(None, slots, "the KV cache slots and rope table rows")}


def check_cache(op: Op, tensors: dict[str, TensorSpec], role: str) -> TensorSpec:
    _, kv_heads, head_dim = head_layout(op)
    cache = tensors[op.inputs.get(role) or op.outputs[role]]
    expect_rank(op, role, cache, 3)
    expect_shape(op, role, cache, (cache.shape[0], kv_heads, head_dim))
    return cache


@register
class RopeSpec(OpSpec):
    kind = "rope"
    doc = (
        "Rotate q (in place) and k by the rotary embedding of each row's position, and append k and v "
        "to the KV cache at that position. One task per KV group."
    )
    inputs = ("qkv", "positions", "cos", "sin")
    outputs = ("out", "k_cache", "v_cache")
    inplace = {"out": "qkv"}
    attributes = ("num_heads", "num_kv_heads", "head_dim")
    gathered_weights = ("cos", "sin")
    cpu_kernel = "rope_task"
    cuda_kernel = "rope_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        qkv = check_qkv(op, tensors)
        head_dim = op.attrs["head_dim"]
        positions = tensors[op.inputs["positions"]]
        expect_shape(op, "positions", positions, (qkv.shape[0],))
        cos = tensors[op.inputs["cos"]]
        expect_rank(op, "cos", cos, 2)
        expect_shape(op, "cos", cos, (cos.shape[0], head_dim))
        expect_shape(op, "sin", tensors[op.inputs["sin"]], cos.shape)
        k_cache = check_cache(op, tensors, "k_cache")
        check_cache(op, tensors, "v_cache")
        if cos.shape[0] < k_cache.shape[0]:
            raise GraphError(f"operator {op.name!r} (rope): the cos table has {cos.shape[0]} positions, fewer than the cache's {k_cache.shape[0]}")
        return {"out": (qkv.shape, qkv.dtype)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return rotary_bounds(op, tensors)

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(g,) for g in range(op.attrs["num_kv_heads"])]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        (group,) = tile
        tokens = tensors[op.inputs["qkv"]].shape[0]
        rows = (0, tokens)
        q, k, v = group_columns(op, group)
        table = tensors[op.inputs["cos"]].shape
        cache_len = tensors[op.outputs["k_cache"]].shape[0]
        # Positions are runtime values, so the task may touch any slot of its KV head.
        slab = ((0, cache_len), (group, group + 1), (0, op.attrs["head_dim"]))
        return [
            Access("qkv", (rows, q), False),
            Access("qkv", (rows, k), False),
            Access("qkv", (rows, v), False),
            Access("positions", (rows,), False),
            Access("cos", ((0, table[0]), (0, table[1])), False),
            Access("sin", ((0, table[0]), (0, table[1])), False),
            Access("out", (rows, q), True),
            Access("k_cache", slab, True),
            Access("v_cache", slab, True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        # Only T rows of the tables and of the cache are touched, not the declared slabs.
        # Per token, the group's q, k and v columns are read and q is written back; one cos
        # and one sin row are read and one k and one v row appended.
        tokens = tensors[op.inputs["qkv"]].shape[0]
        heads, kv_heads, head_dim = head_layout(op)
        width = (heads // kv_heads + 2) * head_dim
        row = 2 * width * element_bytes(tensors, op.inputs["qkv"])
        row += 2 * head_dim * element_bytes(tensors, op.inputs["cos"])
        row += 2 * head_dim * element_bytes(tensors, op.outputs["k_cache"])
        return Cost(tokens * row, 6 * tokens * width)

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        cache_len = tensors[op.outputs["k_cache"]].shape[0]
        q_width, k_base = heads // kv_heads * head_dim, heads * head_dim
        v_base = k_base + kv_heads * head_dim
        return (f"mpk::cpu::rope_task<{tokens}, {row}, {head_dim}, {kv_heads}, {cache_len}>({arg.pointer('out')}, "
                f"{arg.pointer('positions')}, {arg.pointer('cos')}, {arg.pointer('sin')}, {arg.pointer('k_cache')}, "
                f"{arg.pointer('v_cache')}, tile[0], tile[0] * {q_width}, (tile[0] + 1) * {q_width}, "
                f"{k_base} + tile[0] * {head_dim}, {v_base} + tile[0] * {head_dim});")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        cache_len = tensors[op.outputs["k_cache"]].shape[0]
        q_width, k_base = heads // kv_heads * head_dim, heads * head_dim
        v_base = k_base + kv_heads * head_dim
        return (f"mpk::cuda::rope_task<{tokens}, {row}, {head_dim}, {kv_heads}, {cache_len}>({arg.pointer('out')}, "
                f"{arg.pointer('positions')}, {arg.pointer('cos')}, {arg.pointer('sin')}, {arg.pointer('k_cache')}, "
                f"{arg.pointer('v_cache')}, tile[0], tile[0] * {q_width}, (tile[0] + 1) * {q_width}, "
                f"{k_base} + tile[0] * {head_dim}, {v_base} + tile[0] * {head_dim}, smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        (group,) = tile
        head_dim = op.attrs["head_dim"]
        q, k, v = group_columns(op, group)
        qkv, positions = bufs["qkv"], bufs["positions"]
        valid = positions >= 0
        at = positions[valid]
        cos, sin = bufs["cos"][at].to(qkv.dtype), bufs["sin"][at].to(qkv.dtype)

        q_heads = qkv[valid, q[0] : q[1]].reshape(-1, (q[1] - q[0]) // head_dim, head_dim)
        k_head = qkv[valid, k[0] : k[1]].reshape(-1, 1, head_dim)
        bufs["out"][:, q[0] : q[1]] = 0
        bufs["out"][valid, q[0] : q[1]] = rotate(q_heads, cos, sin).reshape(len(at), -1)
        bufs["k_cache"][at, group] = rotate(k_head, cos, sin)[:, 0].to(bufs["k_cache"].dtype)
        bufs["v_cache"][at, group] = qkv[valid, v[0] : v[1]].to(bufs["v_cache"].dtype)


@register
class AttentionSpec(OpSpec):
    kind = "attention"
    doc = (
        "Causal attention of each row's q heads over the KV cache slots 0..position of their KV head "
        "(grouped-query attention). Tiled by KV group and by row blocks. The optional `context` (KV slots "
        "filled before the iteration) only sizes the cost estimate; without it the estimate assumes a "
        "cache half full."
    )
    inputs = ("qkv", "positions", "k_cache", "v_cache")
    outputs = ("out",)
    attributes = ("num_heads", "num_kv_heads", "head_dim", "scale", "context")
    kv_cache_roles = ("k_cache", "v_cache")
    cpu_kernel = "attention_task"
    cuda_kernel = "attention_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        qkv = check_qkv(op, tensors)
        heads, _, head_dim = head_layout(op)
        expect_shape(op, "positions", tensors[op.inputs["positions"]], (qkv.shape[0],))
        k_cache = check_cache(op, tensors, "k_cache")
        expect_shape(op, "v_cache", tensors[op.inputs["v_cache"]], k_cache.shape)
        op.attrs.setdefault("scale", 1.0 / math.sqrt(head_dim))
        return {"out": ((qkv.shape[0], heads * head_dim), None)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return {"positions": IndexBound(None, tensors[op.inputs["k_cache"]].shape[0], "the KV cache slots")}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        kv_heads = op.attrs["num_kv_heads"]
        tokens = tensors[op.inputs["qkv"]].shape[0]
        row_blocks = split(tokens, max(1, plan.workers // kv_heads))
        return [(g, r0, r1) for g in range(kv_heads) for r0, r1 in row_blocks]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        group, r0, r1 = tile
        q, _, _ = group_columns(op, group)
        cache_len = tensors[op.inputs["k_cache"]].shape[0]
        slab = ((0, cache_len), (group, group + 1), (0, op.attrs["head_dim"]))
        return [
            Access("qkv", ((r0, r1), q), False),
            Access("positions", ((r0, r1),), False),
            Access("k_cache", slab, False),
            Access("v_cache", slab, False),
            Access("out", ((r0, r1), q), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        group, r0, r1 = tile
        heads, kv_heads, head_dim = head_layout(op)
        cache_len = tensors[op.inputs["k_cache"]].shape[0]
        group_heads = heads // kv_heads
        if "context" in op.attrs:
            # Row r sits at position context + r and attends to context + r + 1 slots. The
            # tile streams the slots its last row needs once, for all of its rows.
            context = op.attrs["context"]
            slots = min(context + r1, cache_len)
            attended = sum(min(context + r + 1, cache_len) for r in range(r0, r1))
        else:
            # NOTE: positions are runtime values; without a context, assume a cache half full.
            slots = cache_len // 2
            attended = (r1 - r0) * slots
        cache_bytes = 2 * slots * head_dim * element_bytes(tensors, op.inputs["k_cache"])
        q_bytes = (r1 - r0) * group_heads * head_dim * element_bytes(tensors, op.inputs["qkv"])
        out_bytes = (r1 - r0) * group_heads * head_dim * element_bytes(tensors, op.outputs["out"])
        return Cost(cache_bytes + q_bytes + out_bytes, 4 * attended * group_heads * head_dim)

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        cache_len = tensors[op.inputs["k_cache"]].shape[0]
        out_cols = tensors[op.outputs["out"]].shape[1]
        q_width = heads // kv_heads * head_dim
        return (f"mpk::cpu::attention_task<{tokens}, {row}, {head_dim}, {kv_heads}, {cache_len}, {out_cols}>("
                f"{arg.pointer('qkv')}, {arg.pointer('positions')}, {arg.pointer('k_cache')}, {arg.pointer('v_cache')}, "
                f"{arg.pointer('out')}, {cpp_float(op.attrs['scale'])}, tile[0], tile[1], tile[2], "
                f"tile[0] * {q_width}, (tile[0] + 1) * {q_width});")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        cache_len = tensors[op.inputs["k_cache"]].shape[0]
        out_cols = tensors[op.outputs["out"]].shape[1]
        q_width = heads // kv_heads * head_dim
        return (f"mpk::cuda::attention_task<{tokens}, {row}, {head_dim}, {kv_heads}, {cache_len}, {out_cols}>("
                f"{arg.pointer('qkv')}, {arg.pointer('positions')}, {arg.pointer('k_cache')}, {arg.pointer('v_cache')}, "
                f"{arg.pointer('out')}, {cpp_float(op.attrs['scale'])}, tile[0], tile[1], tile[2], "
                f"tile[0] * {q_width}, (tile[0] + 1) * {q_width}, smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        group, r0, r1 = tile
        head_dim, scale = op.attrs["head_dim"], op.attrs["scale"]
        q_cols, _, _ = group_columns(op, group)
        out = bufs["out"]
        out[r0:r1, q_cols[0] : q_cols[1]] = 0
        for row in range(r0, r1):
            position = int(bufs["positions"][row])
            if position < 0:
                continue
            q = bufs["qkv"][row, q_cols[0] : q_cols[1]].reshape(-1, head_dim)
            # Slice, never mask: slots past the position are NaN-poisoned by the reference executor.
            keys = bufs["k_cache"][: position + 1, group].to(q.dtype)
            values = bufs["v_cache"][: position + 1, group].to(q.dtype)
            weights = torch.softmax((q @ keys.T) * scale, dim=-1)
            out[row, q_cols[0] : q_cols[1]] = (weights @ values).reshape(-1)


@register
class FusedAttentionSpec(OpSpec):
    kind = "fused_attention"
    doc = (
        "One task per KV group does what qk_norm, rope and attention do for that group, for every "
        "row: it normalizes its q and k heads (when q_weight and k_weight are bound), rotates them, "
        "appends k and v to the KV cache and attends over it. The decode step uses it, with one task "
        "and one event per group instead of three, so a group's attention starts as soon as its qkv "
        "tile is written."
    )
    inputs = ("qkv", "positions", "cos", "sin")
    optional_inputs = ("q_weight", "k_weight")
    outputs = ("out", "qkv_out", "k_cache", "v_cache")
    inplace = {"qkv_out": "qkv"}
    attributes = ("num_heads", "num_kv_heads", "head_dim", "scale", "eps", "context")
    gathered_weights = ("cos", "sin")
    kv_cache_roles = ("k_cache", "v_cache")
    cpu_kernel = "fused_attention_task"
    cuda_kernel = "fused_attention_task"

    def _parts(self, op: Op) -> list[tuple[OpSpec, Op]]:
        """Return the operators this one fuses, bound to the same tensors, in execution order.
        Before the builder has bound "out" (in infer), the attention part's output is unnamed.
        """
        heads = {key: op.attrs[key] for key in ("num_heads", "num_kv_heads", "head_dim")}
        qkv, positions, cache = op.inputs["qkv"], op.inputs["positions"], {"k_cache": op.outputs["k_cache"], "v_cache": op.outputs["v_cache"]}
        parts = []
        if "q_weight" in op.inputs:
            norm_inputs = {"qkv": qkv, "q_weight": op.inputs["q_weight"], "k_weight": op.inputs["k_weight"]}
            parts.append((spec_of("qk_norm"), Op("qk_norm", op.name, norm_inputs, {"out": qkv}, {**heads, "eps": op.attrs["eps"]})))
        rope_inputs = {"qkv": qkv, "positions": positions, "cos": op.inputs["cos"], "sin": op.inputs["sin"]}
        parts.append((spec_of("rope"), Op("rope", op.name, rope_inputs, {"out": qkv, **cache}, dict(heads))))
        attention_attrs = {**heads, "scale": op.attrs["scale"], **({"context": op.attrs["context"]} if "context" in op.attrs else {})}
        parts.append((spec_of("attention"), Op("attention", op.name, {"qkv": qkv, "positions": positions, **cache},
                                                     {"out": op.outputs.get("out", "")}, attention_attrs)))
        return parts

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        if ("q_weight" in op.inputs) != ("k_weight" in op.inputs):
            raise GraphError(f"operator {op.name!r} (fused_attention): bind both q_weight and k_weight, or neither")
        op.attrs.setdefault("scale", 1.0 / math.sqrt(op.attrs["head_dim"]))
        op.attrs.setdefault("eps", 1e-6)
        qkv = check_qkv(op, tensors)
        for spec, part in self._parts(op):
            inferred = spec.infer(part, tensors)
        return {"out": inferred["out"], "qkv_out": (qkv.shape, qkv.dtype)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return rotary_bounds(op, tensors)

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(g,) for g in range(op.attrs["num_kv_heads"])]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        (group,) = tile
        rows = tensors[op.inputs["qkv"]].shape[0]
        found = []
        for spec, part in self._parts(op):
            part_tile = (group, 0, rows) if part.kind == "attention" else (group,)
            for access in spec.accesses(part, tensors, part_tile):
                # The parts write q and k in place through their "out" role; here that is qkv_out.
                role = "qkv_out" if access.write and access.role == "out" and part.kind != "attention" else access.role
                found.append(Access(role, access.box, access.write))
        # qk_norm and rope both write the q heads: list each region once.
        return list(dict.fromkeys(found))

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        rows = tensors[op.inputs["qkv"]].shape[0]
        costs = [spec.cost(part, tensors, (tile[0], 0, rows) if part.kind == "attention" else tile) for spec, part in self._parts(op)]
        return Cost(sum(c.bytes for c in costs), sum(c.flops for c in costs))

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        _, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        cache_len = tensors[op.outputs["k_cache"]].shape[0]
        out_cols = tensors[op.outputs["out"]].shape[1]
        template = [tokens, row, head_dim, kv_heads, cache_len, out_cols, str("q_weight" in op.inputs).lower()]
        arguments = [arg.pointer("qkv_out"), arg.pointer("positions"), arg.pointer("cos"), arg.pointer("sin"),
                     *qk_norm_pointer_args(op, arg), cpp_float(op.attrs["eps"]), arg.pointer("k_cache"),
                     arg.pointer("v_cache"), arg.pointer("out"), cpp_float(op.attrs["scale"]), "tile[0]",
                     *group_column_args(op)]
        return task_call(backend, "fused_attention_task", template, arguments)

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        rows = bufs["qkv"].shape[0]
        for spec, part in self._parts(op):
            roles = {**{r: bufs[r] for r in part.inputs if r in bufs}, "k_cache": bufs["k_cache"], "v_cache": bufs["v_cache"]}
            roles["out"] = bufs["out"] if part.kind == "attention" else bufs["qkv"]
            spec.run(part, (tile[0], 0, rows) if part.kind == "attention" else tile, roles)
