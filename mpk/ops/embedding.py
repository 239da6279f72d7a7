"""Embedding lookups: one table (decoders), or BERT's sum of word, position and token-type rows."""

from __future__ import annotations

import torch

from mpk.ir.tensor import DTYPE_BYTES, TensorSpec
from mpk.ops.base import Access, Cost, IndexBound, KernelArgs, Op, OpSpec, Tile, TilingPlan, expect_rank, expect_shape, register, task_call
from mpk.ops.tiling import column_parts, split


@register
class EmbeddingSpec(OpSpec):
    kind = "embedding"
    doc = "Look up one row of the embedding table per token. Tiled over hidden columns."
    inputs = ("tokens", "weight")
    outputs = ("out",)
    gathered_weights = ("weight",)
    cpu_kernel = "embedding_task"
    cuda_kernel = "embedding_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        tokens, weight = tensors[op.inputs["tokens"]], tensors[op.inputs["weight"]]
        expect_rank(op, "tokens", tokens, 1)
        expect_rank(op, "weight", weight, 2)
        return {"out": ((tokens.shape[0], weight.shape[1]), None)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        return {"tokens": IndexBound(0, tensors[op.inputs["weight"]].shape[0], f"rows of {op.inputs['weight']!r}")}

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


@register
class EmbeddingSumSpec(OpSpec):
    kind = "embedding_sum"
    doc = (
        "BERT's input embedding: out[t] = (word[tokens[t]] + token_type[token_types[t]]) + "
        "position[positions[t]], in transformers' order. Tiled over rows, like the layernorm that follows it."
    )
    inputs = ("tokens", "positions", "token_types", "word", "position", "token_type")
    outputs = ("out",)
    gathered_weights = ("word", "position", "token_type")
    cpu_kernel = "embedding_sum_task"
    cuda_kernel = "embedding_sum_task"

    def infer(self, op: Op, tensors: dict[str, TensorSpec]):
        tokens = tensors[op.inputs["tokens"]]
        expect_rank(op, "tokens", tokens, 1)
        for role in ("positions", "token_types"):
            expect_shape(op, role, tensors[op.inputs[role]], tokens.shape)
        word = tensors[op.inputs["word"]]
        expect_rank(op, "word", word, 2)
        for role in ("position", "token_type"):
            table = tensors[op.inputs[role]]
            expect_rank(op, role, table, 2)
            expect_shape(op, role, table, (table.shape[0], word.shape[1]))
        return {"out": ((tokens.shape[0], word.shape[1]), None)}

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        tables = (("tokens", "word"), ("positions", "position"), ("token_types", "token_type"))
        return {role: IndexBound(0, tensors[op.inputs[table]].shape[0], f"rows of {op.inputs[table]!r}") for role, table in tables}

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        return split(tensors[op.inputs["tokens"]].shape[0], plan.workers)

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        r0, r1 = tile
        hidden = tensors[op.outputs["out"]].shape[1]
        rows = ((r0, r1),)
        # The table rows read depend on the ids, so whole tables count.
        tables = [Access(role, ((0, tensors[op.inputs[role]].shape[0]), (0, hidden)), False) for role in ("word", "position", "token_type")]
        return [
            Access("tokens", rows, False),
            Access("positions", rows, False),
            Access("token_types", rows, False),
            *tables,
            Access("out", ((r0, r1), (0, hidden)), True),
        ]

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        r0, r1 = tile
        hidden = tensors[op.outputs["out"]].shape[1]
        table_bytes = sum(DTYPE_BYTES[tensors[op.inputs[role]].dtype] for role in ("word", "position", "token_type"))
        out_bytes = DTYPE_BYTES[tensors[op.outputs["out"]].dtype]
        # Only the looked-up rows are read, not the whole tables that accesses() declares.
        return Cost((r1 - r0) * (hidden * (table_bytes + out_bytes) + 24), 2 * (r1 - r0) * hidden)

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: KernelArgs, backend: str) -> str:
        roles = ("tokens", "positions", "token_types", "word", "position", "token_type", "out")
        return task_call(backend, "embedding_sum_task", [tensors[op.outputs["out"]].shape[1]],
                         [*(arg.pointer(role) for role in roles), "tile[0]", "tile[1]"])

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        r0, r1 = tile
        out = bufs["out"]
        total = bufs["word"][bufs["tokens"][r0:r1]].to(out.dtype)
        total = total + bufs["token_type"][bufs["token_types"][r0:r1]].to(out.dtype)
        out[r0:r1] = total + bufs["position"][bufs["positions"][r0:r1]].to(out.dtype)
