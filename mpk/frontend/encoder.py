"""Operator graph of a BERT sentence encoder over a packed batch of sentences.

One iteration takes ``rows`` token rows holding up to ``sentences`` sentences one after
another (see mpk.ops.encoder for the packing inputs) and produces one pooled embedding
per sentence slot. The residual stream is one buffer that every layer updates in place:
the attention output projection and the MLP down projection add into it, and each
LayerNorm normalizes it where it lies.
"""

from __future__ import annotations

import math

from mpk.errors import ConfigError
from mpk.frontend.bert import BertConfig, Pooling
from mpk.ir.builder import GraphBuilder
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import WeightSource
from mpk.target import Target

# Graph input names, which the embedder fills.
# ``pool_spans`` are the rows each sentence's embedding averages: all of its rows for mean
# pooling, only its first ([CLS]) row for cls pooling.
INPUTS = ("tokens", "positions", "token_types", "segments", "spans", "pool_spans")
OUTPUT = "pool.out"


def encoder_graph(cfg: BertConfig, pooling: Pooling, rows: int, sentences: int, prefix: str = "",
                  target: Target | None = None) -> OpGraph:
    """Build the graph of one iteration over ``rows`` packed token rows and ``sentences``
    sentence slots. ``prefix`` is prepended to every checkpoint name ("bert." for a
    checkpoint saved from a BertFor* head model). With a CPU ``target``, linear tiles are
    whole weight panels, several per worker (see ``_cpu_tiling``).
    """
    if sentences < 1 or rows < sentences:
        raise ConfigError(f"an encoder batch needs at least one sentence slot and a row per sentence; "
                          f"got {rows} rows for {sentences} sentences")
    b = GraphBuilder(f"bert-r{rows}-b{sentences}", rows)
    tiling = _cpu_tiling(rows) if target is not None and target.kind == "cpu" else {}
    ckpt = lambda name: WeightSource((prefix + name,))  # noqa: E731
    tokens, positions, token_types, segments = (b.input(name, (rows,), "int64") for name in INPUTS[:4])
    spans = b.input("spans", (sentences, 2), "int64")
    pool_spans = b.input("pool_spans", (sentences, 2), "int64")

    h = cfg.hidden_size
    word = b.weight("word_embeddings", (cfg.vocab_size, h), source=ckpt("embeddings.word_embeddings.weight"))
    position = b.weight("position_embeddings", (cfg.max_positions, h), source=ckpt("embeddings.position_embeddings.weight"))
    token_type = b.weight("token_type_embeddings", (cfg.type_vocab_size, h), source=ckpt("embeddings.token_type_embeddings.weight"))
    inputs = {"tokens": tokens, "positions": positions, "token_types": token_types, "word": word, "position": position, "token_type": token_type}
    hidden = b.add("embedding_sum", "embeddings", inputs)["out"]
    hidden = _layernorm(b, cfg, hidden, "embeddings.LayerNorm", prefix)
    for i in range(cfg.num_layers):
        hidden = encoder_layer(b, cfg, i, hidden, segments, spans, prefix, tiling)

    pooled = b.add("mean_pool", "pool", {"x": hidden, "spans": pool_spans}, normalize=pooling.normalize)["out"]
    b.mark_output(pooled)
    # Every encoder graph has many rows, so the CPU backend packs linear weights into the
    # panels of its outer-product kernel (see mpk.backends.cpu.codegen.panel_weights).
    meta = {"bert": cfg.to_dict(), "pooling": pooling.mode, "normalize": pooling.normalize, "cpu_weight_layout": "panels"}
    return b.build(meta=meta)


def encoder_layer(b: GraphBuilder, cfg: BertConfig, i: int, hidden: str, segments: str, spans: str, prefix: str,
                  tiling: dict | None = None) -> str:
    """Append one BERT layer; returns the residual stream tensor (updated in place).
    ``tiling`` may set the linears' column alignment and tiles per worker.
    """
    tiling = tiling or {}
    h, inter = cfg.hidden_size, cfg.intermediate_size
    p = f"encoder.layer.{i}"
    heads = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_heads, "head_dim": cfg.head_dim}

    # attention
    parts = [f"{prefix}{p}.attention.self.{n}" for n in ("query", "key", "value")]
    rows = {"rows": [h, h, h]}
    qkv_w = b.weight(f"{p}.qkv", (3 * h, h), source=WeightSource(tuple(f"{n}.weight" for n in parts), params=rows))
    qkv_b = b.weight(f"{p}.qkv.bias", (3 * h,), source=WeightSource(tuple(f"{n}.bias" for n in parts), params=rows))
    qkv_align = math.lcm(cfg.head_dim, tiling.get("align", 1))
    qkv = b.add("linear", f"{p}.qkv", {"x": hidden, "weight": qkv_w, "bias": qkv_b}, segments=[h, h, h], align=qkv_align,
                tiles_per_worker=tiling.get("tiles_per_worker", 1))["out"]
    context = b.add("segment_attention", f"{p}.attention", {"qkv": qkv, "segments": segments, "spans": spans}, **heads)["out"]
    hidden = _dense(b, context, f"{p}.attention.output.dense", (h, h), prefix, tiling, residual=hidden)
    hidden = _layernorm(b, cfg, hidden, f"{p}.attention.output.LayerNorm", prefix)

    # mlp
    act = _dense(b, hidden, f"{p}.intermediate.dense", (inter, h), prefix, tiling, activation="gelu")
    hidden = _dense(b, act, f"{p}.output.dense", (h, inter), prefix, tiling, residual=hidden)
    return _layernorm(b, cfg, hidden, f"{p}.output.LayerNorm", prefix)


def _dense(b: GraphBuilder, x: str, name: str, shape: tuple[int, int], prefix: str, tiling: dict,
           residual: str | None = None, activation: str = "none") -> str:
    weight = b.weight(name, shape, source=WeightSource((f"{prefix}{name}.weight",)))
    bias = b.weight(f"{name}.bias", (shape[0],), source=WeightSource((f"{prefix}{name}.bias",)))
    inputs = {"x": x, "weight": weight, "bias": bias}
    outputs = None
    if residual is not None:
        inputs["residual"] = residual
        outputs = {"out": residual}
    align = tiling.get("align", 16)
    if shape[0] % align:
        align = 1
    return b.add("linear", name, inputs, outputs, activation=activation, align=align,
                 tiles_per_worker=tiling.get("tiles_per_worker", 1))["out"]


def _cpu_tiling(rows: int) -> dict:
    """Return the linear tiling for the CPU backend. Tiles of whole 48-column weight panels
    waste no work in linear_panels_task. With many rows each task is long, and four tiles
    per worker let the static schedule balance them (a fused qkv of three equal segments
    would otherwise give two workers three tiles). With few rows the extra tasks cost more
    than the balance gains. Measured with benchmarks/embed_throughput.py on a 2-core Zen 5
    VM, four per worker took all-MiniLM-L6-v2 at batch 32 (about 800 rows) from 394 to 439
    sentences/s and at batch 1 (about 32 rows) from 405 down to 361.
    NOTE: the 128-row threshold lies between those two points and is an estimate.
    """
    from mpk.backends.cpu.codegen import PANEL

    return {"align": PANEL, "tiles_per_worker": 4 if rows >= 128 else 1}


def _layernorm(b: GraphBuilder, cfg: BertConfig, x: str, name: str, prefix: str) -> str:
    weight = b.weight(name, (cfg.hidden_size,), source=WeightSource((f"{prefix}{name}.weight",)))
    bias = b.weight(f"{name}.bias", (cfg.hidden_size,), source=WeightSource((f"{prefix}{name}.bias",)))
    return b.add("layernorm", name, {"x": x, "weight": weight, "bias": bias}, {"out": x}, eps=cfg.layer_norm_eps)["out"]
