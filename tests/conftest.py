"""Shared checkpoints, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checkpoints import make_checkpoint

# With head_dim 16 and theta 1e4, an original context of 32 puts the test model's
# frequencies in all three llama3 bands: kept, blended and divided by factor.
LLAMA3_TEST_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float32 Qwen3 checkpoint with untied embeddings and default RoPE."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float32 Llama checkpoint with tied embeddings and llama3 RoPE scaling."""
    return make_checkpoint(
        tmp_path_factory.mktemp("llama"),
        "llama",
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_TEST_ROPE_SCALING,
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_build_cache(tmp_path_factory: pytest.TempPathFactory):
    """Build the CPU backend's libraries into a fresh cache, as on a clean machine."""
    previous = os.environ.get("MPK_CACHE_DIR")
    os.environ["MPK_CACHE_DIR"] = str(tmp_path_factory.mktemp("mpk-cache"))
    yield
    if previous is None:
        os.environ.pop("MPK_CACHE_DIR", None)
    else:
        os.environ["MPK_CACHE_DIR"] = previous
