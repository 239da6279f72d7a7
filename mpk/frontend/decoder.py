"""Operator graphs of Qwen3 and Llama decoders, built layer by layer from a ModelConfig.

Weights are attached by checkpoint name only, so a graph (and a compiled task graph)
can be built from a config alone. Fused projections name the checkpoint tensors they
concatenate: q|k|v for the attention input and gate|up for the MLP.
"""

from __future__ import annotations

from mpk.errors import ConfigError
from mpk.frontend.config import ModelConfig
from mpk.ir.builder import GraphBuilder
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import WeightSource
from mpk.ops.linear import linear_tiles
from mpk.target import Target

# Columns per argmax_partial task: large enough that the partial maxima stay few
# (37 for a 151,936-token vocabulary), small enough to spread over many workers.
ARGMAX_CHUNK = 4096
# Fewest KV cache slots per chunk of split decode attention: a shorter chunk's task would
# cost more in overhead than it reads.
MIN_SPLIT_SLOTS = 512


def hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}.weight"


def decoder_graph(cfg: ModelConfig, tokens: int, max_seq_len: int, target: Target | None = None,
                  attention_splits: int | None = None) -> OpGraph:
    """Build the graph of one iteration that processes ``tokens`` rows with a KV cache of
    ``max_seq_len`` slots per layer. With a ``target``, the argmax chunks line up with the
    lm_head tiles it will get, so each argmax task waits for exactly one lm_head tile.
    ``attention_splits`` (decode only) splits attention over that many chunks of the
    cache; by default ``decode_attention_splits`` picks it from the target.
    """
    if max_seq_len > cfg.max_positions:
        raise ConfigError(
            f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={cfg.max_positions}; "
            f"use a max_seq_len of at most {cfg.max_positions}"
        )
    if max_seq_len < tokens:
        raise ConfigError(f"max_seq_len={max_seq_len} is smaller than tokens per iteration={tokens}")
    b = GraphBuilder(f"{cfg.architecture}-t{tokens}", tokens)
    wdt = cfg.dtype
    tok = b.input("tokens", (tokens,), "int64")
    positions = b.input("positions", (tokens,), "int64")
    rope_params = {"rope": _rope_dict(cfg), "head_dim": cfg.head_dim}
    cos = b.weight("rope.cos", (max_seq_len, cfg.head_dim), "float32", WeightSource(generator="rope_cos", params=rope_params))
    sin = b.weight("rope.sin", (max_seq_len, cfg.head_dim), "float32", WeightSource(generator="rope_sin", params=rope_params))

    embed = b.weight("embed_tokens", (cfg.vocab_size, cfg.hidden_size), wdt, WeightSource(("model.embed_tokens.weight",)))
    hidden = b.embedding(tok, embed, name="embedding")
    splits = 1
    if tokens == 1:
        splits = attention_splits if attention_splits is not None else decode_attention_splits(cfg, max_seq_len, target)
    for i in range(cfg.num_layers):
        hidden = decoder_layer(b, cfg, i, hidden, positions, cos, sin, max_seq_len, splits)

    final_norm = b.weight("norm", (cfg.hidden_size,), wdt, WeightSource(("model.norm.weight",)))
    normed = b.rmsnorm(hidden, final_norm, cfg.rms_norm_eps, name="final_norm")
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = b.weight("lm_head", (cfg.vocab_size, cfg.hidden_size), wdt, WeightSource((head_name,)))
    head_align = _align(cfg.vocab_size)
    logits = b.mark_output(b.linear(normed, head, name="lm_head", align=head_align))
    chunk = ARGMAX_CHUNK
    if target is not None:
        lo, hi = linear_tiles([cfg.vocab_size], head_align, target.tiling)[0]
        chunk = hi - lo
    b.mark_output(b.argmax(logits, chunk=chunk))
    return b.build(meta={"model": cfg.to_dict(), "max_seq_len": max_seq_len})


def decode_attention_splits(cfg: ModelConfig, max_seq_len: int, target: Target | None) -> int:
    """Chunks of the KV cache that decode attention splits over: enough that every SM has
    a task (one per KV group and chunk), with chunks of at least MIN_SPLIT_SLOTS slots.
    CPU targets, with a few workers for the KV groups, do not split.
    """
    if target is None or target.kind == "cpu":
        return 1
    return max(1, min(target.workers // cfg.num_kv_heads, max_seq_len // MIN_SPLIT_SLOTS))


def decoder_layer(b: GraphBuilder, cfg: ModelConfig, i: int, hidden: str, positions: str, cos: str, sin: str, max_seq_len: int,
                  attention_splits: int = 1) -> str:
    """Append one decoder layer; returns the residual stream tensor (updated in place)."""
    wdt = cfg.dtype
    heads = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = f"layers.{i}"

    # attention
    norm1 = b.weight(f"{p}.input_layernorm", (cfg.hidden_size,), wdt, WeightSource((hf_layer(i, "input_layernorm"),)))
    x = b.rmsnorm(hidden, norm1, cfg.rms_norm_eps, name=f"{p}.input_layernorm")
    qkv_names = tuple(hf_layer(i, f"self_attn.{n}_proj") for n in "qkv")
    qkv_w = b.weight(f"{p}.qkv_proj", (q + 2 * kv, cfg.hidden_size), wdt, WeightSource(qkv_names, params={"rows": [q, kv, kv]}))
    qkv = b.linear(x, qkv_w, name=f"{p}.qkv_proj", segments=[q, kv, kv], align=cfg.head_dim)
    cache_shape = (max_seq_len, cfg.num_kv_heads, cfg.head_dim)
    k_cache, v_cache = b.state(f"{p}.k_cache", cache_shape), b.state(f"{p}.v_cache", cache_shape)
    if b.tokens == 1 and attention_splits > 1:
        # Decode over a long cache on many SMs: per KV group and cache chunk, then merged.
        attn = _split_attention(b, cfg, i, qkv, positions, cos, sin, k_cache, v_cache, heads, attention_splits)
    elif b.tokens == 1:
        # Decode: q/k norm, rope, the KV append and attention as one task per KV group.
        attn = _fused_attention(b, cfg, i, qkv, positions, cos, sin, k_cache, v_cache, heads)
    else:
        # Prompt chunks keep separate operators, so attention can also split by rows.
        if cfg.qk_norm:
            qn = b.weight(f"{p}.q_norm", (cfg.head_dim,), wdt, WeightSource((hf_layer(i, "self_attn.q_norm"),)))
            kn = b.weight(f"{p}.k_norm", (cfg.head_dim,), wdt, WeightSource((hf_layer(i, "self_attn.k_norm"),)))
            qkv = b.qk_norm(qkv, qn, kn, eps=cfg.rms_norm_eps, name=f"{p}.qk_norm", **heads)
        qkv = b.rope(qkv, positions, cos, sin, k_cache, v_cache, name=f"{p}.rope", **heads)
        attn = b.attention(qkv, positions, k_cache, v_cache, name=f"{p}.attention", **heads)
    o_w = b.weight(f"{p}.o_proj", (cfg.hidden_size, q), wdt, WeightSource((hf_layer(i, "self_attn.o_proj"),)))
    hidden = b.linear(attn, o_w, name=f"{p}.o_proj", residual=hidden, out=hidden, align=_align(cfg.hidden_size))

    # mlp
    norm2 = b.weight(f"{p}.post_attention_layernorm", (cfg.hidden_size,), wdt, WeightSource((hf_layer(i, "post_attention_layernorm"),)))
    x = b.rmsnorm(hidden, norm2, cfg.rms_norm_eps, name=f"{p}.post_attention_layernorm")
    inter = cfg.intermediate_size
    gate_up_w = b.weight(f"{p}.gate_up_proj", (2 * inter, cfg.hidden_size), wdt, WeightSource((hf_layer(i, "mlp.gate_proj"), hf_layer(i, "mlp.up_proj")), params={"rows": [inter, inter]}))
    gate_up = b.linear(x, gate_up_w, name=f"{p}.gate_up_proj", segments=[inter, inter], align=_align(inter))
    act = b.silu_mul(gate_up, name=f"{p}.silu_mul", align=_align(inter))
    down_w = b.weight(f"{p}.down_proj", (cfg.hidden_size, inter), wdt, WeightSource((hf_layer(i, "mlp.down_proj"),)))
    return b.linear(act, down_w, name=f"{p}.down_proj", residual=hidden, out=hidden, align=_align(cfg.hidden_size))


def _attention_inputs(b: GraphBuilder, cfg: ModelConfig, i: int, qkv: str, positions: str, cos: str, sin: str) -> dict:
    p = f"layers.{i}"
    inputs = {"qkv": qkv, "positions": positions, "cos": cos, "sin": sin}
    if cfg.qk_norm:
        inputs["q_weight"] = b.weight(f"{p}.q_norm", (cfg.head_dim,), cfg.dtype, WeightSource((hf_layer(i, "self_attn.q_norm"),)))
        inputs["k_weight"] = b.weight(f"{p}.k_norm", (cfg.head_dim,), cfg.dtype, WeightSource((hf_layer(i, "self_attn.k_norm"),)))
    return inputs


def _fused_attention(b: GraphBuilder, cfg: ModelConfig, i: int, qkv: str, positions: str, cos: str, sin: str,
                     k_cache: str, v_cache: str, heads: dict) -> str:
    inputs = _attention_inputs(b, cfg, i, qkv, positions, cos, sin)
    outputs = {"qkv_out": qkv, "k_cache": k_cache, "v_cache": v_cache}
    return b.add("fused_attention", f"layers.{i}.attention", inputs, outputs, eps=cfg.rms_norm_eps, **heads)["out"]


def _split_attention(b: GraphBuilder, cfg: ModelConfig, i: int, qkv: str, positions: str, cos: str, sin: str,
                     k_cache: str, v_cache: str, heads: dict, chunks: int) -> str:
    inputs = _attention_inputs(b, cfg, i, qkv, positions, cos, sin)
    outputs = {"k_cache": k_cache, "v_cache": v_cache}
    partials = b.add("split_attention", f"layers.{i}.attention", inputs, outputs, eps=cfg.rms_norm_eps, chunks=chunks,
                     **heads)["partials"]
    return b.add("attention_combine", f"layers.{i}.attention_combine", {"partials": partials}, **heads)["out"]


def _align(columns: int) -> int:
    """Column alignment of tiles: 16 (one 64-byte vector of fp32, two 16-byte loads of bf16)
    when the width allows it, else 1.
    """
    return 16 if columns % 16 == 0 else 1


def _rope_dict(cfg: ModelConfig) -> dict:
    r = cfg.rope
    return {
        "theta": r.theta,
        "kind": r.kind,
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_positions": r.original_max_positions,
    }
