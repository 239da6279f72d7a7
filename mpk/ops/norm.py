"""RMSNorm over whole rows, and per-head RMSNorm of q and k (Qwen3's q_norm and k_norm)."""

from __future__ import annotations

import torch

from mpk.errors import GraphError
from mpk.ir.tensor import TensorSpec
from mpk.ops.base import Access, Cost, KernelArgs, Op, OpSpec, Tile, TilingPlan, attr, cpp_float, expect_rank, expect_shape, register, task_call
from mpk.ops.tiling import split


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize the last dimension the way transformers' Llama and Qwen3 RMSNorm do."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight.to(x.dtype) * (x * torch.rsqrt(variance + eps))


@register
class RmsNormSpec(OpSpec):
    kind = "rmsnorm"
    doc = "out = x / rms(x) * weight over each row. Tiled over rows: a row needs all its columns."
    inputs = ("x", "weight")
    outputs = ("out",)
    attributes = ("eps",)
    cpu_kernel = "rmsnorm_task"
    cuda_kernel = "rmsnorm_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        x, weight = tensors[op.inputs["x"]], tensors[op.inputs["weight"]]
        expect_rank(op, "x", x, 2)
        expect_shape(op, "weight", weight, (x.shape[1],))
        attr(op, "eps")
        return {"out": (x.shape, None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        rows = tensors[op.inputs["x"]].shape[0]
        return split(rows, plan.workers)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        r0, r1 = tile
        hidden = tensors[op.inputs["x"]].shape[1]
        return [
            Access("x", ((r0, r1), (0, hidden)), False),
            Access("weight", ((0, hidden),), False),
            Access("out", ((r0, r1), (0, hidden)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        moved = super().cost(op, tensors, tile)
        r0, r1 = tile
        return Cost(moved.bytes, 4 * (r1 - r0) * tensors[op.inputs["x"]].shape[1])

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        hidden = tensors[op.inputs["x"]].shape[1]
        return (f"mpk::cpu::rmsnorm_task<{hidden}, {arg.element('weight')}>({arg.pointer('x')}, {arg.pointer('weight')}, "
                f"{arg.pointer('out')}, {cpp_float(op.attrs['eps'])}, tile[0], tile[1]);")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        hidden = tensors[op.inputs["x"]].shape[1]
        return (f"mpk::cuda::rmsnorm_task<{hidden}>({arg.pointer('x')}, {arg.pointer('weight')}, {arg.pointer('out')}, "
                f"{cpp_float(op.attrs['eps'])}, tile[0], tile[1], smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        r0, r1 = tile
        bufs["out"][r0:r1] = rms_normalize(bufs["x"][r0:r1], bufs["weight"], op.attrs["eps"])


def head_layout(op: Op) -> tuple[int, int, int]:
    """Return (num_heads, num_kv_heads, head_dim) of an attention-related operator."""
    heads, kv_heads, head_dim = attr(op, "num_heads"), attr(op, "num_kv_heads"), attr(op, "head_dim")
    if heads % kv_heads:
        raise GraphError(f"operator {op.name!r}: num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    return heads, kv_heads, head_dim


def group_columns(op: Op, group: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Return the column ranges of the q heads, the k head and the v head of one KV group
    inside a fused QKV row laid out as [q heads | k heads | v heads].
    """
    heads, kv_heads, head_dim = head_layout(op)
    q_width = heads // kv_heads * head_dim
    k_base = heads * head_dim
    v_base = k_base + kv_heads * head_dim
    q = (group * q_width, (group + 1) * q_width)
    k = (k_base + group * head_dim, k_base + (group + 1) * head_dim)
    v = (v_base + group * head_dim, v_base + (group + 1) * head_dim)
    return q, k, v


def group_column_args(op: Op) -> list[str]:
    """Return C++ expressions of q0, q1, k0 and v0, group_columns' bounds for the KV group
    in ``tile[0]``, as the kernels that take a group's columns expect them.
    """
    heads, kv_heads, head_dim = head_layout(op)
    q_width, k_base = heads // kv_heads * head_dim, heads * head_dim
    v_base = k_base + kv_heads * head_dim
    return [f"tile[0] * {q_width}", f"(tile[0] + 1) * {q_width}", f"{k_base} + tile[0] * {head_dim}",
            f"{v_base} + tile[0] * {head_dim}"]


def qk_norm_pointer_args(op: Op, arg: KernelArgs) -> list[str]:
    """Return the q_weight and k_weight pointers, or two typed null pointers when the
    operator normalizes no heads (its kernel's QK_NORM is then false).
    """
    if "q_weight" in op.inputs:
        return [arg.pointer("q_weight"), arg.pointer("k_weight")]
    null = f"static_cast<const {arg.element('qkv')}*>(nullptr)"
    return [null, null]


def check_qkv(op: Op, tensors: dict[str, TensorSpec]) -> TensorSpec:
    heads, kv_heads, head_dim = head_layout(op)
    qkv = tensors[op.inputs["qkv"]]
    expect_rank(op, "qkv", qkv, 2)
    expect_shape(op, "qkv", qkv, (qkv.shape[0], (heads + 2 * kv_heads) * head_dim))
    return qkv


@register
class QkNormSpec(OpSpec):
    kind = "qk_norm"
    doc = "RMSNorm of every q and k head (Qwen3), in place on the fused QKV rows. One task per KV group."
    inputs = ("qkv", "q_weight", "k_weight")
    outputs = ("out",)
    inplace = {"out": "qkv"}
    attributes = ("num_heads", "num_kv_heads", "head_dim", "eps")
    cpu_kernel = "qk_norm_task"
    cuda_kernel = "qk_norm_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        qkv = check_qkv(op, tensors)
        head_dim = op.attrs["head_dim"]
        expect_shape(op, "q_weight", tensors[op.inputs["q_weight"]], (head_dim,))
        expect_shape(op, "k_weight", tensors[op.inputs["k_weight"]], (head_dim,))
        attr(op, "eps")
        return {"out": (qkv.shape, qkv.dtype)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return [(g,) for g in range(op.attrs["num_kv_heads"])]

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        rows = (0, tensors[op.inputs["qkv"]].shape[0])
        q, k, _ = group_columns(op, tile[0])
        head_dim = (0, op.attrs["head_dim"])
        return [
            Access("qkv", (rows, q), False),
            Access("qkv", (rows, k), False),
            Access("q_weight", (head_dim,), False),
            Access("k_weight", (head_dim,), False),
            Access("out", (rows, q), True),
            Access("out", (rows, k), True),
        ]

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        q_width, k_base = heads // kv_heads * head_dim, heads * head_dim
        return (f"mpk::cpu::qk_norm_task<{tokens}, {row}, {head_dim}, {arg.element('q_weight')}>({arg.pointer('out')}, "
                f"{arg.pointer('q_weight')}, {arg.pointer('k_weight')}, {cpp_float(op.attrs['eps'])}, "
                f"tile[0] * {q_width}, (tile[0] + 1) * {q_width}, {k_base} + tile[0] * {head_dim}, {k_base} + (tile[0] + 1) * {head_dim});")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs) -> str:
        heads, kv_heads, head_dim = head_layout(op)
        tokens, row = tensors[op.inputs["qkv"]].shape
        q_width, k_base = heads // kv_heads * head_dim, heads * head_dim
        return (f"mpk::cuda::qk_norm_task<{tokens}, {row}, {head_dim}>({arg.pointer('out')}, {arg.pointer('q_weight')}, "
                f"{arg.pointer('k_weight')}, {cpp_float(op.attrs['eps'])}, tile[0] * {q_width}, (tile[0] + 1) * {q_width}, "
                f"{k_base} + tile[0] * {head_dim}, {k_base} + (tile[0] + 1) * {head_dim}, smem);")

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        head_dim, eps = op.attrs["head_dim"], op.attrs["eps"]
        q, k, _ = group_columns(op, tile[0])
        for (c0, c1), weight in ((q, bufs["q_weight"]), (k, bufs["k_weight"])):
            heads = bufs["qkv"][:, c0:c1].reshape(-1, (c1 - c0) // head_dim, head_dim)
            bufs["out"][:, c0:c1] = rms_normalize(heads, weight, eps).reshape(-1, c1 - c0)


@register
class LayerNormSpec(OpSpec):
    kind = "layernorm"
    doc = (
        "out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over each row (BERT's LayerNorm; "
        "var is the biased variance). Tiled over rows; may run in place."
    )
    inputs = ("x", "weight", "bias")
    outputs = ("out",)
    inplace = {"out": "x"}
    attributes = ("eps",)
    cpu_kernel = "layernorm_task"
    cuda_kernel = "layernorm_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        x = tensors[op.inputs["x"]]
        expect_rank(op, "x", x, 2)
        expect_shape(op, "weight", tensors[op.inputs["weight"]], (x.shape[1],))
        expect_shape(op, "bias", tensors[op.inputs["bias"]], (x.shape[1],))
        attr(op, "eps")
        return {"out": (x.shape, None)}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return split(tensors[op.inputs["x"]].shape[0], plan.workers)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        r0, r1 = tile
        hidden = tensors[op.inputs["x"]].shape[1]
        return [
            Access("x", ((r0, r1), (0, hidden)), False),
            Access("weight", ((0, hidden),), False),
            Access("bias", ((0, hidden),), False),
            Access("out", ((r0, r1), (0, hidden)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        r0, r1 = tile
        return Cost(super().cost(op, tensors, tile).bytes, 7 * (r1 - r0) * tensors[op.inputs["x"]].shape[1])

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        pointers = [arg.pointer(role) for role in ("x", "weight", "bias", "out")]
        return task_call(backend, "layernorm_task", [tensors[op.inputs["x"]].shape[1]],
                         [*pointers, cpp_float(op.attrs["eps"]), "tile[0]", "tile[1]"])

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        r0, r1 = tile
        x = bufs["x"][r0:r1]
        weight, bias = bufs["weight"].to(x.dtype), bufs["bias"].to(x.dtype)
        bufs["out"][r0:r1] = torch.nn.functional.layer_norm(x, (x.shape[1],), weight, bias, op.attrs["eps"])
