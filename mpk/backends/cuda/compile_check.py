"""Compile the megakernels of the test models and of all-MiniLM-L6-v2 for every GPU architecture, without a GPU.

    python -m mpk.backends.cuda.compile_check [--update-baseline]

Prints ptxas registers, shared memory and spills per architecture, and exits non-zero
when a megakernel spills more than ci/ptxas_baseline.json allows (new spills fail CI).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mpk.backends.cuda.build import SUPPORTED_ARCHS, build_megakernel, megakernel_stats
from mpk.backends.cuda.codegen import generate_source
from mpk.compiler.pipeline import compile_graph
from mpk.frontend.decoder import decoder_graph
from mpk.target import gpu_target

BASELINE = Path(__file__).resolve().parents[3] / "ci" / "ptxas_baseline.json"


def test_model_configs():
    """The shapes of the tiny checkpoints the tests build, from config alone."""
    from mpk.frontend.config import ModelConfig, RopeConfig

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, rms_norm_eps=1e-6, max_positions=128, dtype="bfloat16")
    return {
        "qwen3-tiny": ModelConfig(architecture="qwen3", rope=RopeConfig(theta=1e4), tie_word_embeddings=False, qk_norm=True, **common),
        "llama-tiny": ModelConfig(architecture="llama", rope=RopeConfig(theta=1e4, kind="llama3", factor=8.0, original_max_positions=32),
                                  tie_word_embeddings=True, qk_norm=False, **common),
    }


def minilm_graph(rows: int, sentences: int):
    """all-MiniLM-L6-v2's encoder graph, from its published shape (no files needed)."""
    from mpk.frontend.bert import BertConfig, Pooling
    from mpk.frontend.encoder import encoder_graph

    cfg = BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12,
                     max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
    return encoder_graph(cfg, Pooling("mean", True, 256), rows, sentences)


def compile_all() -> dict[str, dict[str, dict[str, int]]]:
    target = gpu_target("h100")
    sources = {}
    for name, cfg in test_model_configs().items():
        for tokens in (1, 16):
            sources[f"{name}-t{tokens}"] = generate_source(compile_graph(decoder_graph(cfg, tokens, 128, target), target))
    # Decode with attention split over 4 chunks of the cache (long caches on many SMs).
    split = decoder_graph(test_model_configs()["qwen3-tiny"], 1, 128, target, attention_splits=4)
    sources["qwen3-tiny-t1-split4"] = generate_source(compile_graph(split, target))
    sources["minilm-r512-b32"] = generate_source(compile_graph(minilm_graph(512, 32), target))
    jobs = [(model, arch) for model in sources for arch in SUPPORTED_ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        libraries = list(pool.map(lambda job: build_megakernel(sources[job[0]], job[1]), jobs))
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for (model, arch), library in zip(jobs, libraries):
        s = megakernel_stats(library)
        stats.setdefault(arch, {})[model] = {"registers": s.registers, "shared_bytes": s.shared_bytes,
                                             "spill_stores": s.spill_stores, "spill_loads": s.spill_loads}
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-baseline", action="store_true", help=f"write the measured spills to {BASELINE}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory():
        stats = compile_all()
    print(f"{'arch':8s} {'model':16s} {'registers':>9s} {'smem B':>7s} {'spill st':>8s} {'spill ld':>8s}")
    for arch, models in stats.items():
        for model, s in models.items():
            print(f"{arch:8s} {model:16s} {s['registers']:9d} {s['shared_bytes']:7d} {s['spill_stores']:8d} {s['spill_loads']:8d}")
    if args.update_baseline:
        BASELINE.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        return 0
    baseline = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    regressions = [
        f"{arch} {model}: {s['spill_stores']} bytes of spill stores, baseline {baseline.get(arch, {}).get(model, {}).get('spill_stores', 0)}"
        for arch, models in stats.items() for model, s in models.items()
        if s["spill_stores"] > baseline.get(arch, {}).get(model, {}).get("spill_stores", 0)
    ]
    for line in regressions:
        print(f"new register spills: {line}", file=sys.stderr)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
