"""transformers runs of the models mpk is checked against: greedy decoding and sentence embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Mismatch:
    position: int | None        # first new-token index where the tokens differ, or None
    logits_rel_error: float     # ||mpk - reference|| / ||reference|| over compared steps
    worst_step_rel_error: float


def transformers_greedy(model_dir: str | Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32) -> tuple[list[int], torch.Tensor]:
    """Return the greedy tokens and the logits they were chosen from, [new tokens, vocab]."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(dtype).eval()
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    # The whole sequence is recomputed at every step: no cache API to track across
    # transformers releases, at a cost that only matters for long generations.
    with torch.no_grad():
        while len(tokens) < max_new_tokens:
            logits = model(torch.tensor([prompt + tokens]), use_cache=False).logits[0, -1].float()
            rows.append(logits)
            tokens.append(int(logits.argmax()))
    return tokens, torch.stack(rows)


def compare(tokens: list[int], logits: torch.Tensor, ref_tokens: list[int], ref_logits: torch.Tensor) -> Mismatch:
    """Compare up to and including the first differing token (later steps see different inputs)."""
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    steps = len(tokens) if first is None else first + 1
    a, b = logits[:steps].double(), ref_logits[:steps].double()
    total = float((a - b).norm() / b.norm())
    worst = max(float((a[i] - b[i]).norm() / b[i].norm()) for i in range(steps))
    return Mismatch(first, total, worst)


def transformers_sentence_embeddings(model_dir: str | Path, sentences: list[str], max_length: int, mode: str = "mean",
                                     normalize: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Embeddings as sentence-transformers computes them, with transformers' BertModel in
    ``dtype``: tokenize (truncated to ``max_length``), run the model, pool the rows the
    attention mask keeps (mean, or the [CLS] row), then L2-normalize. Returns [N, hidden].
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(dtype).eval()
    encoded = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        rows = model(**encoded).last_hidden_state
    if mode == "cls":
        pooled = rows[:, 0]
    else:
        mask = encoded["attention_mask"].unsqueeze(-1).to(dtype)
        pooled = (rows * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def cosine_similarities(a, b) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, D] arrays, in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
