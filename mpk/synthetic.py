"""Small random Qwen3 and Llama checkpoints, written by transformers, for tests and the demo.

Every parameter, norm weights included, is drawn from a seeded generator, so a bug that
ignores a weight or swaps two of them changes the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

_MODEL_CLASSES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}

# transformers_version of v4-layout configs. Qwen3 support arrived in transformers 4.51.0.
_V4_TRANSFORMERS_VERSION = "4.51.0"


def make_checkpoint(
    path: Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    vocab_size: int = 256,
    max_positions: int = 128,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    rope_theta: float = 10000.0,
    config_layout: str = "v5",
    shard_size: str | None = None,
) -> Path:
    """Save a randomly initialised model with save_pretrained into `path` and return `path`.

    rope_scaling takes the transformers keys, such as {"rope_type": "llama3", "factor": 8.0,
    ...}. None means default RoPE. config_layout "v5" keeps the config.json that
    transformers 5 writes. "v4" rewrites it the way transformers 4.x wrote it, as in the
    released checkpoints. shard_size, such as "20KB", splits the weights into shards with
    an index file.
    """
    if arch not in _MODEL_CLASSES:
        raise ValueError(f"arch must be one of {sorted(_MODEL_CLASSES)}, got {arch!r}")
    if config_layout not in ("v4", "v5"):
        raise ValueError(f"config_layout must be 'v4' or 'v5', got {config_layout!r}")

    config_class, model_class = _MODEL_CLASSES[arch]
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters=rope_parameters,
    )
    model = model_class(config).eval()
    _randomize(model, seed)
    _check_logits_vary(model, seed)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    if shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=shard_size)

    if config_layout == "v4":
        _rewrite_config_as_v4(path / "config.json")
    return path


def reference_model(path: str | Path) -> PreTrainedModel:
    """Load a checkpoint directory with transformers, in float32 and eval mode, offline."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval()


def _randomize(model: PreTrainedModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters lists a tied lm_head weight once, under embed_tokens.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                # Also the output projection when tied. This spread keeps logits near unit scale.
                param.copy_(0.2 * noise)
            else:
                # Linear weights: 1/sqrt(fan_in) keeps activations near unit scale.
                param.copy_(noise / math.sqrt(param.shape[-1]))


def _check_logits_vary(model: PreTrainedModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 32), generator=generator)
    with torch.no_grad():
        logits = model(tokens).logits[0]
    if not torch.isfinite(logits).all():
        raise RuntimeError("Random weights produced non-finite logits. Lower the weight scale.")
    distinct = logits.argmax(dim=-1).unique().numel()
    if distinct < 8:
        raise RuntimeError(
            f"Random weights predict only {distinct} distinct tokens over 32 positions, "
            "too few for the test model to catch bugs. Change the weight scales."
        )


def _rewrite_config_as_v4(config_path: Path) -> None:
    config = json.loads(config_path.read_text())

    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    # transformers 4.x Qwen3 configs carry no layer_types.
    config.pop("layer_types", None)
    config["transformers_version"] = _V4_TRANSFORMERS_VERSION

    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
