"""The GPU check: build, correctness against transformers, and decode latency, on one GPU.

    scripts/gpu_check            (writes gpu_check.md and gpu_check.log to $OUT when set)

Sized to finish in about 8 minutes on one H200: tiny test checkpoints, then Qwen3-0.6B- and
Qwen3-8B-shaped models whose seeded random weights are made on the GPU and handed to
both mpk and transformers in memory (no 16 GB checkpoint is written), and sentence
embeddings with the real all-MiniLM-L6-v2 weights against transformers in float64.

NOTE: written without a GPU at hand; its first run on one is also its first test.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LOG = logging.getLogger("mpk.gpu_check")
PROMPT = [17, 3, 250, 42, 99, 8, 123, 77, 5, 200]
NEW_TOKENS = 32
TIMED_STEPS = 50
BUDGET_SECONDS = 8 * 60


def hf_config(cfg):
    """A transformers config with the shape of an mpk ModelConfig."""
    from transformers import LlamaConfig, Qwen3Config

    config_class = Qwen3Config if cfg.architecture == "qwen3" else LlamaConfig
    rope = {"rope_type": "default", "rope_theta": cfg.rope.theta}
    return config_class(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.rms_norm_eps,
                        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope)


def random_model(cfg, seed: int):
    """A bf16 transformers model on the GPU with every weight drawn from a seeded generator."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                param.copy_(0.2 * noise)
            else:
                # 1/sqrt(fan_in) keeps activations near unit scale through the layers.
                param.copy_(noise * param.shape[-1] ** -0.5)
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    tokens: list[int] = []
    rows = []
    with torch.no_grad():
        while len(tokens) < new_tokens:
            logits = model(torch.tensor([prompt + tokens], device="cuda"), use_cache=False).logits[0, -1].float()
            rows.append(logits.cpu())
            tokens.append(int(logits.argmax()))
    return tokens, torch.stack(rows)


def hbm_read_bandwidth() -> float:
    data = torch.ones(2**30, dtype=torch.bfloat16, device="cuda")  # 2 GiB, far larger than L2
    data.sum()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 2 / best


def check_model(name: str, cfg, checkpoint, reference, rows: list[dict], bandwidth: float, baselines: bool,
                attention_splits: int | None = None) -> None:
    from mpk.bench import bytes_per_token
    from mpk.generate import Session

    session = Session(None, cfg=cfg, checkpoint=checkpoint, max_seq_len=128, backend="cuda",
                      attention_splits=attention_splits)
    result = session.generate(PROMPT, NEW_TOKENS)
    ref_tokens, ref_logits = hf_greedy(reference, PROMPT, NEW_TOKENS)
    first = next((i for i, (a, b) in enumerate(zip(result.tokens, ref_tokens)) if a != b), None)
    steps = NEW_TOKENS if first is None else first + 1
    error = float((result.logits[:steps] - ref_logits[:steps]).norm() / ref_logits[:steps].norm())
    LOG.info("%s: tokens %s, first difference %s, logits relative error %.3e", name, result.tokens, first, error)

    executor = session.executors[1]
    times = []
    for i in range(TIMED_STEPS):
        inputs = {"tokens": torch.tensor([PROMPT[i % len(PROMPT)]]), "positions": torch.tensor([len(PROMPT) + i])}
        start = time.perf_counter()
        executor.run(inputs)
        times.append(time.perf_counter() - start)
    mpk_seconds = statistics.median(times)
    token_bytes = bytes_per_token(session, len(PROMPT) + TIMED_STEPS // 2)
    row = {"model": name, "tokens": "match" if first is None else f"differ at {first}", "rel_error": error,
           "mpk": mpk_seconds, "bytes": token_bytes, "floor": token_bytes / bandwidth}
    if baselines:
        from mpk.bench import compile_for_decode, decode_latency

        row["eager"] = decode_latency(reference, PROMPT, TIMED_STEPS, "cuda")
        compile_for_decode(reference, "cuda")
        row["cuda_graphs"] = decode_latency(reference, PROMPT, TIMED_STEPS, "cuda")
    rows.append(row)


EMBED_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "", "Grüße aus Köln, 東京は晴れです 🙂", "word " * 300,
                   "Megakernels run a whole model in one persistent kernel.", "?!", "Short.", "A longer sentence " * 12]
# bf16 activations on the GPU: the bound that --verify uses on the CPU (0.99999) is for fp32.
EMBED_MIN_COSINE = 0.999


def check_embeddings(backend: str = "cuda") -> dict:
    """all-MiniLM-L6-v2 on the cuda backend: lowest cosine similarity to transformers in
    float64 (on the CPU), and sentences/s at batch 32 (median of 5 passes, compiles excluded).
    """
    from mpk.embed import Embedder
    from mpk.hf_reference import cosine_similarities, transformers_sentence_embeddings

    sentences = EMBED_SENTENCES * 8
    embedder = Embedder(backend=backend, batch_size=32)
    embeddings = embedder.embed(sentences)
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        embedder.embed(sentences)
        times.append(time.perf_counter() - begin)
    reference = transformers_sentence_embeddings(embedder.model_dir, EMBED_SENTENCES, embedder.pooling.max_seq_length)
    embedder.close()
    cosine = float(cosine_similarities(embeddings[: len(EMBED_SENTENCES)], reference).min())
    LOG.info("all-MiniLM-L6-v2: lowest cosine similarity %.6f, %.0f sentences/s", cosine, len(sentences) / statistics.median(times))
    return {"cosine": cosine, "sentences_per_second": len(sentences) / statistics.median(times)}


def main() -> int:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    handlers = [logging.StreamHandler(sys.stdout)] + ([logging.FileHandler(out / "gpu_check.log")] if out else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers)
    from mpk.backends.cuda.executor import check_device
    from mpk.frontend.presets import get_preset
    from mpk.generate import TensorCheckpoint

    start = time.perf_counter()
    arch, props = check_device(1)
    LOG.info("device: %s, %d SMs, building for %s", props.name, props.multi_processor_count, arch)
    bandwidth = hbm_read_bandwidth()
    LOG.info("HBM read bandwidth (torch.sum over 2 GiB): %.0f GB/s", bandwidth / 1e9)

    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_positions=128)
    qwen3_tiny = dataclasses.replace(get_preset("qwen3-0.6b"), tie_word_embeddings=False, **tiny)
    # (name, config, with baselines, decode attention chunks). A 128-slot cache does not
    # split decode attention by default, so the split kernels get a run of their own.
    models = [
        ("qwen3-tiny", qwen3_tiny, False, None),
        ("qwen3-tiny-split4", qwen3_tiny, False, 4),
        ("llama-tiny", dataclasses.replace(get_preset("llama-3.2-1b"), **tiny, rope=dataclasses.replace(get_preset("llama-3.2-1b").rope, kind="default")), False, None),
        ("qwen3-0.6b", get_preset("qwen3-0.6b"), True, None),
        ("qwen3-8b", get_preset("qwen3-8b"), True, None),
    ]
    rows: list[dict] = []
    try:
        embeddings = check_embeddings()
    except Exception as err:  # report and go on: the decoder checks are independent
        LOG.exception("the embedding check failed")
        embeddings = {"error": f"{type(err).__name__}: {err}"}
    for name, cfg, baselines, splits in models:
        if time.perf_counter() - start > BUDGET_SECONDS:
            LOG.warning("skipped %s: the %d s budget is spent", name, BUDGET_SECONDS)
            continue
        reference = random_model(cfg, seed=0)
        check_model(name, cfg, TensorCheckpoint(dict(reference.state_dict())), reference, rows, bandwidth, baselines, splits)
        del reference
        torch.cuda.empty_cache()

    table = format_table(rows, props.name, bandwidth) + "\n\n" + format_embeddings(embeddings)
    print(table)
    if out:
        (out / "gpu_check.md").write_text(table + "\n")
    decoders_ok = all(r["tokens"] == "match" for r in rows if "tiny" in r["model"])
    return 0 if decoders_ok and embeddings.get("cosine", 0.0) >= EMBED_MIN_COSINE else 1


def format_embeddings(result: dict) -> str:
    if "error" in result:
        return f"all-MiniLM-L6-v2 embeddings (cuda backend): FAILED: {result['error']}"
    return (f"all-MiniLM-L6-v2 embeddings (cuda backend, batch 32): lowest cosine similarity to transformers "
            f"{result['cosine']:.6f} (bound {EMBED_MIN_COSINE}), {result['sentences_per_second']:.0f} sentences/s")


def format_table(rows: list[dict], device: str, bandwidth: float) -> str:
    lines = [f"GPU check on {device}; HBM read bandwidth {bandwidth / 1e9:.0f} GB/s (torch.sum over 2 GiB)", "",
             "| model | tokens vs transformers | logits rel. error | mpk ms/token | GB/s | % of HBM floor | eager ms/token | CUDA graphs ms/token |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eager = f"{r['eager'] * 1e3:.3f}" if "eager" in r else "-"
        graphs = f"{r['cuda_graphs'] * 1e3:.3f}" if "cuda_graphs" in r else "-"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['rel_error']:.2e} | {r['mpk'] * 1e3:.3f} | {r['bytes'] / r['mpk'] / 1e9:.0f} | "
                     f"{r['floor'] / r['mpk'] * 100:.0f}% | {eager} | {graphs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        sys.exit(main())
