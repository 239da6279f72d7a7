"""Greedy decoding of a checkpoint through compiled task graphs.

Two task graphs are compiled from the same model: a prompt chunk of ``chunk`` tokens and
a single-token decode step. They share the weights and the KV cache. The last chunk of
a prompt is padded with rows at position -1, which the attention operators skip.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mpk.compiler.pipeline import compile_graph
from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import ConfigError, MpkError
from mpk.frontend.checkpoint import Checkpoint
from mpk.frontend.config import ModelConfig, load_config
from mpk.frontend.decoder import decoder_graph
from mpk.runtime.reference import ReferenceExecutor, new_state
from mpk.runtime.weights import load_weights
from mpk.target import Target, cpu_target

log = logging.getLogger("mpk.generate")

BACKENDS = ("cpu", "cuda", "reference")


def default_backend() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class TensorCheckpoint:
    """Checkpoint tensors held in memory (a transformers model's state_dict), by name."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def load(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.tensors:
            raise MpkError(f"tensor {name!r} is missing from the in-memory checkpoint")
        tensor = self.tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise MpkError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        return tensor.to(dtype)


@dataclass
class Generation:
    tokens: list[int]            # the new tokens
    logits: torch.Tensor         # [new tokens, vocab]: the logits each new token was chosen from


def cache_length(cfg: ModelConfig, needed: int, requested: int | None) -> int:
    """Return the KV-cache length: ``requested``, or ``needed`` rounded up to 64 slots."""
    if needed > cfg.max_positions:
        raise ConfigError(
            f"the prompt plus the new tokens need {needed} positions, but the model supports "
            f"max_position_embeddings={cfg.max_positions}; shorten the prompt or lower --max-new-tokens"
        )
    if requested is not None:
        if requested < needed:
            raise ConfigError(f"--max-seq-len {requested} is too short for {needed} positions (prompt plus new tokens); raise it to at least {needed}")
        return requested
    return min(cfg.max_positions, math.ceil(needed / 64) * 64)


class Session:
    """A model compiled for one backend, with its KV cache."""

    def __init__(self, model_dir: str | Path | None, *, max_seq_len: int, chunk: int = 16, backend: str = "cpu",
                 target: Target | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, mode: str = "static",
                 trace: bool = False, watchdog_seconds: float = 10.0, max_delay_ns: int = 0, sanitize: str | None = None,
                 cfg: ModelConfig | None = None, checkpoint=None, attention_splits: int | None = None) -> None:
        """Compile a checkpoint directory, or (with ``model_dir=None``) a ``cfg`` whose weights
        come from ``checkpoint``, any object with Checkpoint's ``load(name, shape, dtype)``.
        ``attention_splits`` overrides the target's choice of decode attention chunks.
        """
        if backend not in BACKENDS:
            raise MpkError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
        if (model_dir is None) != (cfg is not None and checkpoint is not None):
            raise MpkError("pass either a checkpoint directory or both cfg and checkpoint")
        self.cfg = cfg or load_config(model_dir)
        if target is None and backend == "cuda":
            from mpk.backends.cuda.executor import cuda_target

            target = cuda_target()
        self.target = target or cpu_target()
        self.max_seq_len = max_seq_len
        self.chunk = max(1, min(chunk, max_seq_len))
        self.graphs: dict[int, TaskGraph] = {}
        for tokens in sorted({1, self.chunk}):
            graph = decoder_graph(self.cfg, tokens, max_seq_len, self.target, attention_splits)
            self.graphs[tokens] = compile_graph(graph, self.target)
        checkpoint = checkpoint or Checkpoint(model_dir)
        weight_dtype = torch.bfloat16 if backend == "cuda" else torch.float32
        weights = load_weights(self.graphs[1].graph, checkpoint, weight_dtype, keep_bf16=backend == "cpu")
        state = new_state(self.graphs[1], dtype) if backend != "cuda" else {}
        self.cuda_state: dict[str, torch.Tensor] = {}  # filled by the first CUDA executor, shared by the second
        self.backend = backend
        self.executors = {}
        for tokens, tg in self.graphs.items():
            if backend == "reference":
                self.executors[tokens] = ReferenceExecutor(tg, weights, state, seed=seed + tokens, dtype=dtype)
            elif backend == "cuda":
                from mpk.backends.cuda.executor import CudaExecutor

                self.executors[tokens] = CudaExecutor(tg, weights, self.cuda_state, trace=trace, watchdog_seconds=watchdog_seconds)
            else:
                from mpk.backends.cpu.executor import CpuExecutor

                self.executors[tokens] = CpuExecutor(tg, weights, state, mode=mode, trace=trace, watchdog_seconds=watchdog_seconds,
                                                     max_delay_ns=max_delay_ns, sanitize=sanitize)
        self.position = 0

    def step(self, tokens: list[int]) -> tuple[int, torch.Tensor]:
        """Feed up to ``chunk`` tokens at the next positions; return the greedy next token and its logits."""
        rows = 1 if len(tokens) == 1 else self.chunk
        if len(tokens) > rows:
            raise MpkError(f"{len(tokens)} tokens do not fit one chunk of {rows}")
        self._check_tokens(tokens)
        if self.position + len(tokens) > self.max_seq_len:
            raise ConfigError(f"position {self.position + len(tokens)} exceeds the KV cache of {self.max_seq_len} slots")
        ids = torch.zeros(rows, dtype=torch.int64)
        ids[: len(tokens)] = torch.tensor(tokens)
        positions = torch.full((rows,), -1, dtype=torch.int64)
        positions[: len(tokens)] = torch.arange(self.position, self.position + len(tokens))
        out = self.executors[rows].run({"tokens": ids, "positions": positions})
        self.position += len(tokens)
        last = len(tokens) - 1
        # The CPU backend's outputs are its live buffers: copy what outlives this step.
        return int(out["argmax.reduce.out"][last]), out["lm_head.out"][last].to("cpu", torch.float32, copy=True)

    def _check_tokens(self, tokens: list[int]) -> None:
        for t in tokens:
            if not 0 <= t < self.cfg.vocab_size:
                raise MpkError(f"token id {t} is outside the vocabulary 0..{self.cfg.vocab_size - 1}")

    def close(self) -> None:
        """Stop the backend's worker threads."""
        for executor in self.executors.values():
            if hasattr(executor, "close"):
                executor.close()

    def generate(self, prompt: list[int], max_new_tokens: int, stop_tokens: tuple[int, ...] = ()) -> Generation:
        """Greedy-decode up to ``max_new_tokens`` tokens after ``prompt``, stopping after a
        token in ``stop_tokens``. Starts from position 0: the KV cache of an earlier call is
        overwritten, never read.
        """
        self.position = 0
        if not prompt:
            raise MpkError("the prompt is empty; pass at least one token id")
        if max_new_tokens < 1:
            raise MpkError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        needed = len(prompt) + max_new_tokens - 1  # the last new token is never fed back
        if needed > self.max_seq_len:
            raise ConfigError(
                f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens need {needed} "
                f"positions, but the KV cache has {self.max_seq_len}; compile the session with a larger max_seq_len"
            )
        # prefill
        for start in range(0, len(prompt), self.chunk):
            token, logits = self.step(prompt[start : start + self.chunk])
        tokens, rows = [token], [logits]
        # decode
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_tokens:
            token, logits = self.step([tokens[-1]])
            tokens.append(token)
            rows.append(logits)
        return Generation(tokens, torch.stack(rows))
