"""Published model shapes, for sizing and reports without a checkpoint on disk.

Each entry copies the config.json of the Hugging Face repository named in its comment.
NOTE: the values were transcribed without network access and not re-read from those
files. tests/test_config.py checks them against the parameter counts on the model cards.
"""

from __future__ import annotations

from mpk.errors import ConfigError
from mpk.frontend.config import ModelConfig, RopeConfig

_QWEN3_ROPE = RopeConfig(theta=1_000_000.0)

# Llama 3.1 and 3.2 scale RoPE frequencies with rope_type "llama3".
_LLAMA3_8B_ROPE = RopeConfig(
    theta=500_000.0,
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_positions=8192,
)
_LLAMA32_1B_ROPE = RopeConfig(
    theta=500_000.0,
    kind="llama3",
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_positions=8192,
)

PRESETS: dict[str, ModelConfig] = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=_QWEN3_ROPE,
        max_positions=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        dtype="bfloat16",
    ),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=_QWEN3_ROPE,
        max_positions=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        dtype="bfloat16",
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=_QWEN3_ROPE,
        max_positions=40960,
        tie_word_embeddings=False,
        qk_norm=True,
        dtype="bfloat16",
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=_LLAMA32_1B_ROPE,
        max_positions=131072,
        tie_word_embeddings=True,
        qk_norm=False,
        dtype="bfloat16",
    ),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=_LLAMA3_8B_ROPE,
        max_positions=131072,
        tie_word_embeddings=False,
        qk_norm=False,
        dtype="bfloat16",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Look up a preset by name, raising ConfigError with the known names if it is absent."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
