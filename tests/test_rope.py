from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from checkpoints import reference_model
from mpk.errors import ConfigError
from mpk.frontend.config import ModelConfig, RopeConfig, load_config
from mpk.frontend.presets import get_preset
from mpk.frontend.rope import cos_sin, inv_freq

FLOAT32_EPS = torch.finfo(torch.float32).eps


def rotary_for_preset(config: ModelConfig) -> LlamaRotaryEmbedding:
    """transformers' rotary module for a preset's shape, without building the model."""
    rope = config.rope
    hf_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_positions,
        rope_parameters={
            "rope_type": rope.kind,
            "rope_theta": rope.theta,
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_positions,
        },
    )
    return LlamaRotaryEmbedding(hf_config)


def test_default_inv_freq_closed_form() -> None:
    rope = RopeConfig(theta=10000.0)
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)

    result = inv_freq(rope, 16)

    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("fixture_name", ["qwen3_dir", "llama_dir"])
def test_inv_freq_matches_model(fixture_name: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture_name)
    config = load_config(model_dir)
    rotary = reference_model(model_dir).model.rotary_emb

    expected = rotary.inv_freq.to(torch.float64)

    # transformers computes in float32, so 1e-6 relative leaves room only for rounding.
    torch.testing.assert_close(inv_freq(config.rope, config.head_dim), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "qwen3-8b"])
def test_inv_freq_matches_transformers_for_preset(name: str) -> None:
    config = get_preset(name)
    expected = rotary_for_preset(config).inv_freq.to(torch.float64)

    torch.testing.assert_close(inv_freq(config.rope, config.head_dim), expected, rtol=1e-6, atol=0)


def test_llama3_test_rope_covers_all_bands(llama_dir: Path) -> None:
    # Guards the fixture: a model whose frequencies skip a band leaves that branch untested.
    config = load_config(llama_dir)
    rope = config.rope
    unscaled = inv_freq(RopeConfig(theta=rope.theta), config.head_dim)
    scaled = inv_freq(rope, config.head_dim)

    unchanged = torch.isclose(scaled, unscaled, rtol=1e-12, atol=0)
    divided = torch.isclose(scaled, unscaled / rope.factor, rtol=1e-12, atol=0)
    blended = ~unchanged & ~divided

    assert unchanged.any()
    assert divided.any()
    assert blended.any()
    assert (scaled[blended] < unscaled[blended]).all()
    assert (scaled[blended] > unscaled[blended] / rope.factor).all()


@pytest.mark.parametrize("fixture_name", ["qwen3_dir", "llama_dir"])
def test_cos_sin_match_model(fixture_name: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture_name)
    config = load_config(model_dir)
    rotary = reference_model(model_dir).model.rotary_emb
    positions = torch.arange(config.max_positions)

    expected_cos, expected_sin = rotary(torch.zeros(1), positions[None])
    cos, sin = cos_sin(config.rope, config.head_dim, positions)

    assert cos.shape == (config.max_positions, config.head_dim)
    assert sin.shape == (config.max_positions, config.head_dim)
    # The reference rounds each angle to float32, an error of up to about eps * angle.
    max_angle = (config.max_positions - 1) * inv_freq(config.rope, config.head_dim).max().item()
    atol = 2 * FLOAT32_EPS * max_angle
    torch.testing.assert_close(cos, expected_cos[0].to(torch.float64), rtol=1e-6, atol=atol)
    torch.testing.assert_close(sin, expected_sin[0].to(torch.float64), rtol=1e-6, atol=atol)


def test_cos_sin_rotate_half_layout() -> None:
    rope = RopeConfig(theta=10000.0)
    cos, sin = cos_sin(rope, 16, torch.arange(10))

    assert torch.equal(cos[:, :8], cos[:, 8:])
    assert torch.equal(sin[:, :8], sin[:, 8:])


def test_cos_sin_at_given_positions() -> None:
    rope = get_preset("llama-3.1-8b").rope
    positions = torch.tensor([70000, 0, 5])
    freq = inv_freq(rope, 128)

    cos, sin = cos_sin(rope, 128, positions)

    for row, position in enumerate(positions.tolist()):
        for column in (0, 37, 63):
            angle = position * freq[column].item()
            assert cos[row, column].item() == pytest.approx(math.cos(angle), abs=1e-12)
            assert sin[row, column + 64].item() == pytest.approx(math.sin(angle), abs=1e-12)


def test_float_positions_match_integer_positions() -> None:
    rope = RopeConfig(theta=500000.0)

    from_int = cos_sin(rope, 64, torch.arange(8))
    from_float = cos_sin(rope, 64, torch.arange(8, dtype=torch.float32))

    assert torch.equal(from_int[0], from_float[0])
    assert torch.equal(from_int[1], from_float[1])


def test_odd_head_dim_rejected() -> None:
    with pytest.raises(ConfigError, match="even head_dim, got 15"):
        inv_freq(RopeConfig(theta=10000.0), 15)


def test_two_dimensional_positions_rejected() -> None:
    with pytest.raises(ValueError, match=r"1-D tensor, got shape \(1, 4\)"):
        cos_sin(RopeConfig(theta=10000.0), 16, torch.arange(4)[None])
