"""Helpers shared by the generation, compiler, verifier and CLI tests.

The transformers reference here is computed in the test itself, not through
mpk.hf_reference, so a bug in that module cannot hide wrong output from mpk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from checkpoints import reference_model
from mpk.frontend.config import ModelConfig, RopeConfig

# Ten ids below the test vocabulary of 256, with no repeats, so the prompt is not a loop.
PROMPT = [17, 3, 250, 42, 99, 8, 123, 77, 5, 200]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run torch on one thread for the module's tests.

    The tests multiply tiny matrices. On a 2-core machine with two other busy processes,
    torch's default thread pool made test_generate_reference.py take 110 s instead of 3.5 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Greedy:
    tokens: list[int]
    logits: torch.Tensor  # [new tokens, vocab], float64


def greedy_reference(model_dir: Path, prompt: list[int], new_tokens: int) -> Greedy:
    """Run greedy decoding with transformers in float32, recomputing the whole sequence each step."""
    model = reference_model(model_dir)
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        while len(tokens) < new_tokens:
            logits = model(torch.tensor([prompt + tokens]), use_cache=False).logits[0, -1]
            rows.append(logits.double())
            tokens.append(int(logits.argmax()))
    return Greedy(tokens, torch.stack(rows))


def worst_step_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the largest per-step relative error ||logits - reference|| / ||reference||."""
    logits, reference = logits.double(), reference.double()
    errors = (logits - reference).norm(dim=1) / reference.norm(dim=1)
    return float(errors.max())


def odd_config(**overrides) -> ModelConfig:
    """A Qwen3-shaped config whose widths are not multiples of 16, so tiles have remainders."""
    values = dict(
        architecture="qwen3",
        vocab_size=1000,
        hidden_size=72,
        intermediate_size=200,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=18,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        max_positions=128,
        tie_word_embeddings=False,
        qk_norm=True,
        dtype="float32",
    )
    values.update(overrides)
    return ModelConfig(**values)
