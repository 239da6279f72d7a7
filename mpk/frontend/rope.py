"""Rotary position embedding tables in the layout that transformers' Llama and Qwen3 use.

Those models rotate with rotate_half, so the cos and sin rows repeat the per-frequency
values twice: column j and column j + head_dim // 2 share frequency j.
"""

from __future__ import annotations

import math

import torch

from mpk.errors import ConfigError
from mpk.frontend.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Compute the head_dim // 2 inverse frequencies in float64, with llama3 scaling if set."""
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ConfigError(f"RoPE needs a positive, even head_dim, got {head_dim}.")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    base = 1.0 / torch.pow(torch.tensor(rope.theta, dtype=torch.float64), exponents)

    if rope.kind == "default":
        return base
    if rope.kind == "llama3":
        return _scale_llama3(base, rope)
    raise ConfigError(f"RoPE kind {rope.kind!r} is not supported. Use 'default' or 'llama3'.")


def _scale_llama3(freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Apply Llama 3.1 frequency scaling, the rule of transformers' _compute_llama3_parameters.

    Wavelengths shorter than original_max_positions / high_freq_factor stay as they are.
    Wavelengths longer than original_max_positions / low_freq_factor are stretched by
    factor. In between, the frequency blends linearly from freq / factor to freq as
    original_max_positions / wavelength rises from low_freq_factor to high_freq_factor.
    """
    wavelength = 2 * math.pi / freq
    short_limit = rope.original_max_positions / rope.high_freq_factor
    long_limit = rope.original_max_positions / rope.low_freq_factor

    blend = (rope.original_max_positions / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * freq / rope.factor + blend * freq

    scaled = torch.where(wavelength > long_limit, freq / rope.factor, freq)
    # Both bounds are inclusive, as in transformers. The blend is continuous there anyway.
    in_between = (wavelength >= short_limit) & (wavelength <= long_limit)
    return torch.where(in_between, blended, scaled)


def cos_sin(
    rope: RopeConfig, head_dim: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute float64 cos and sin tables of shape [len(positions), head_dim].

    positions is a 1-D tensor of token positions (integer or floating). The attention
    scaling that transformers multiplies in is 1.0 for both supported kinds, so it is omitted.
    """
    if positions.dim() != 1:
        raise ValueError(
            f"positions must be a 1-D tensor, got shape {tuple(positions.shape)}. "
            "Flatten it or pass one sequence at a time."
        )
    freq = inv_freq(rope, head_dim)
    angles = positions.to(torch.float64)[:, None] * freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()
