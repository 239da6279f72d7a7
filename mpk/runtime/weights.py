"""Loading the weights an operator graph names, from a checkpoint or from a generator."""

from __future__ import annotations

import torch

from mpk.errors import CheckpointError
from mpk.frontend.checkpoint import Checkpoint
from mpk.frontend.config import RopeConfig
from mpk.frontend.rope import cos_sin
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorKind, TensorSpec


def load_weights(graph: OpGraph, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, keep_bf16: bool = False) -> dict[str, torch.Tensor]:
    """Return every weight of ``graph`` by tensor name, converted to ``dtype``; with
    ``keep_bf16``, bfloat16 checkpoint tensors stay bfloat16. Generated tables (rope) are
    always float32.

    Checkpoint tensors are checked against the shapes the graph expects, so a checkpoint
    that does not match its config fails here with the tensor and file named.
    """
    weights = {}
    for spec in graph.tensors_of(TensorKind.WEIGHT):
        stored = torch.bfloat16 if keep_bf16 and spec.dtype == "bfloat16" and not spec.source.generator else dtype
        weights[spec.name] = load_weight(spec, checkpoint, stored)
    return weights


def load_weight(spec: TensorSpec, checkpoint: Checkpoint, dtype: torch.dtype) -> torch.Tensor:
    source = spec.source
    if source is None:
        raise CheckpointError(f"weight {spec.name!r} has no source: name the checkpoint tensors it comes from")
    if source.generator:
        return generate_table(spec, torch.float32)
    rows = source.params.get("rows", [spec.shape[0]])
    if len(rows) != len(source.names) or sum(rows) != spec.shape[0]:
        raise CheckpointError(f"weight {spec.name!r}: parts {list(source.names)} with rows {rows} do not make shape {list(spec.shape)}")
    parts = [checkpoint.load(name, (n, *spec.shape[1:]), dtype) for name, n in zip(source.names, rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def generate_table(spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    params = spec.source.params
    if spec.source.generator in ("rope_cos", "rope_sin"):
        rope = RopeConfig(**params["rope"])
        cos, sin = cos_sin(rope, params["head_dim"], torch.arange(spec.shape[0]))
        return (cos if spec.source.generator == "rope_cos" else sin).to(dtype)
    raise CheckpointError(f"weight {spec.name!r} names unknown generator {spec.source.generator!r}")
