"""Acceptance: greedy decoding through compiled task graphs on the reference executor
produces transformers' tokens and logits.

Each case generates 32 tokens after a 10-token prompt. The executor runs tasks in a
seeded random order that the events permit, so the seeds exercise different orders.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mpk.runtime.reference as reference_module
from checkpoints import make_checkpoint
from conftest import LLAMA3_TEST_ROPE_SCALING
from fixtures_models import NEW_TOKENS, PROMPT, Greedy, greedy_reference, single_torch_thread, worst_step_error  # noqa: F401 (fixture)
from mpk.frontend.checkpoint import INDEX_FILE, Checkpoint
from mpk.frontend.config import load_config
from mpk.generate import Generation, Session, cache_length
from mpk.ops import spec_of
from mpk.target import Target, cpu_target

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LOGITS_TOLERANCE = 1e-4


@dataclass
class Model:
    name: str
    path: Path
    reference: Greedy


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request: pytest.FixtureRequest) -> Model:
    """One of the shared checkpoints with its transformers greedy output, computed once."""
    path = request.getfixturevalue(f"{request.param}_dir")
    return Model(request.param, path, greedy_reference(path, PROMPT, NEW_TOKENS))


def make_session(model_dir: Path, target: Target, seed: int, chunk: int) -> Session:
    cfg = load_config(model_dir)
    max_seq_len = cache_length(cfg, len(PROMPT) + NEW_TOKENS, None)
    return Session(model_dir, max_seq_len=max_seq_len, chunk=chunk, target=target, seed=seed, backend="reference")


def run_greedy(model_dir: Path, target: Target, seed: int = 0, chunk: int = 4) -> Generation:
    return make_session(model_dir, target, seed, chunk).generate(PROMPT, NEW_TOKENS)


# --- the two shared checkpoints -----------------------------------------------------------


def test_reference_tokens_vary(model: Model) -> None:
    # A reference that repeats one token would let a broken mpk pass by luck.
    assert len(set(model.reference.tokens)) >= 4


# Chunks that do not divide the 10-token prompt: 4 pads the last chunk (4 + 4 + 2 rows),
# and with 3 the last prompt token goes through the decode graph (3 + 3 + 3 + 1).
# Chunk 16 pads the whole prompt into one chunk.
@pytest.mark.parametrize("workers", [1, 2, 7, 64])
@pytest.mark.parametrize("seed, chunk", [(0, 4), (1, 16), (2, 3)])
def test_greedy_matches_transformers(model: Model, workers: int, seed: int, chunk: int) -> None:
    result = run_greedy(model.path, cpu_target(workers), seed, chunk)

    assert result.tokens == model.reference.tokens
    assert worst_step_error(result.logits, model.reference.logits) < LOGITS_TOLERANCE


@pytest.mark.parametrize("splits", [2, 5])
def test_split_decode_attention_matches_transformers(model: Model, splits: int) -> None:
    cfg = load_config(model.path)
    max_seq_len = cache_length(cfg, len(PROMPT) + NEW_TOKENS, None)
    session = Session(model.path, max_seq_len=max_seq_len, chunk=4, target=cpu_target(7), seed=3, backend="reference",
                      attention_splits=splits)
    result = session.generate(PROMPT, NEW_TOKENS)

    assert result.tokens == model.reference.tokens
    assert worst_step_error(result.logits, model.reference.logits) < LOGITS_TOLERANCE


def test_remainder_tiles_match_transformers(model: Model) -> None:
    target = dataclasses.replace(cpu_target(7), min_columns=1)
    session = make_session(model.path, target, seed=5, chunk=4)
    result = session.generate(PROMPT, NEW_TOKENS)

    for tokens, tg in session.graphs.items():
        widths = {}
        for t in range(tg.num_tasks):
            if tg.op[t] >= 0 and tg.graph.ops[tg.op[t]].kind == "linear":
                c0, c1 = tg.tile[t]
                widths.setdefault(tg.op[t], set()).add(c1 - c0)
        assert any(len(w) > 1 for w in widths.values()), f"no linear operator has a remainder tile at tokens={tokens}"
    assert result.tokens == model.reference.tokens
    assert worst_step_error(result.logits, model.reference.logits) < LOGITS_TOLERANCE


def test_seeds_change_task_order(qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The seeded cases above are only worth running if the seed changes the order.
    order: list[tuple[str, tuple]] = []

    class Recorder:
        def __init__(self, kind: str) -> None:
            self.spec = spec_of(kind)

        def run(self, op, tile, bufs) -> None:
            order.append((op.name, tuple(tile)))
            self.spec.run(op, tile, bufs)

    monkeypatch.setattr(reference_module, "spec_of", Recorder)
    orders = []
    for seed in (0, 1):
        order.clear()
        make_session(qwen3_dir, cpu_target(7), seed, chunk=4).step(PROMPT[:4])
        orders.append(list(order))

    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] != orders[1]


# --- checkpoint variants ----------------------------------------------------------------


VARIANTS = {
    "bf16-qwen3": dict(arch="qwen3", dtype=torch.bfloat16),
    "bf16-llama": dict(arch="llama", dtype=torch.bfloat16, tie_word_embeddings=True, rope_scaling=LLAMA3_TEST_ROPE_SCALING),
    "sharded-qwen3": dict(arch="qwen3", shard_size="20KB"),
    "sharded-llama": dict(arch="llama", shard_size="20KB", rope_scaling=LLAMA3_TEST_ROPE_SCALING),
    "v4-qwen3": dict(arch="qwen3", config_layout="v4"),
    "v4-llama": dict(arch="llama", config_layout="v4", tie_word_embeddings=True, rope_scaling=LLAMA3_TEST_ROPE_SCALING),
    # Widths that are not multiples of 16 (so tiles are not aligned), one KV head shared by
    # all query heads, and plain multi-head attention over three layers.
    "odd-qwen3-one-kv-head": dict(arch="qwen3", hidden_size=72, intermediate_size=200, vocab_size=251, num_heads=4, num_kv_heads=1, head_dim=18),
    "odd-llama-mha": dict(arch="llama", hidden_size=40, intermediate_size=66, vocab_size=301, num_heads=5, num_kv_heads=5, head_dim=8, num_layers=3),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    options = dict(VARIANTS[request.param])
    arch = options.pop("arch")
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=3, **options)
    return request.param, path


def test_variant_is_what_it_claims(variant: tuple[str, Path]) -> None:
    name, path = variant
    if name.startswith("bf16"):
        assert Checkpoint(path).dtype == "bfloat16"
    elif name.startswith("sharded"):
        assert (path / INDEX_FILE).is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    elif name.startswith("odd"):
        assert load_config(path).hidden_size % 16 != 0
    else:
        config = json.loads((path / "config.json").read_text())
        assert "rope_theta" in config
        assert "rope_parameters" not in config


def test_variant_matches_transformers(variant: tuple[str, Path]) -> None:
    _, path = variant
    reference = greedy_reference(path, PROMPT, NEW_TOKENS)

    result = run_greedy(path, cpu_target(7), seed=4, chunk=4)

    assert result.tokens == reference.tokens
    assert worst_step_error(result.logits, reference.logits) < LOGITS_TOLERANCE
