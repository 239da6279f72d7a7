"""Write the seeded random checkpoints that docs/benchmarks.md measures.

    python benchmarks/make_checkpoints.py --out bench-models [--only qwen3-40m]

Each is a Qwen3-architecture checkpoint saved by transformers in safetensors format;
the weights are random (the speed of a decode step does not depend on their values).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mpk.synthetic import make_checkpoint

SHAPES = {
    # About 40M parameters: hidden 512, 8 layers, vocabulary 32000, fp32.
    "qwen3-40m": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4,
                      head_dim=64, vocab_size=32000, max_positions=2048, tie_word_embeddings=True, dtype=torch.float32),
    # Qwen3-0.6B's published shape, bf16.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, vocab_size=151936, max_positions=40960, tie_word_embeddings=True,
                       rope_theta=1e6, dtype=torch.bfloat16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write one checkpoint directory per shape into")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append", help="write only this shape (repeatable)")
    args = parser.parse_args()
    for name in args.only or sorted(SHAPES):
        path = make_checkpoint(args.out / name, "qwen3", seed=0, **SHAPES[name])
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
