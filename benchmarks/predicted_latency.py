"""Predicted per-iteration GPU latency of model shapes under each execution model, as a
Markdown table. These are simulator predictions, not measurements.

    python benchmarks/predicted_latency.py [--preset llama-3.2-1b] [--gpu h100] [--context 128] [--batch 1]

One row per model shape and GPU: the four execution models of `mpk simulate` and the HBM
floor, in milliseconds per iteration (one token per sequence in decode).
"""

from __future__ import annotations

import argparse

from mpk.frontend.presets import get_preset
from mpk.sim.predict import Scenario, simulate_config
from mpk.target import gpu_names, gpu_spec

PRESETS = ["qwen3-0.6b", "llama-3.2-1b", "qwen3-8b"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help=f"model shape (repeatable; default {', '.join(PRESETS)})")
    parser.add_argument("--gpu", action="append", help="GPU (repeatable; default all four)")
    parser.add_argument("--batch", type=int, default=1, help="rows per iteration (default 1)")
    parser.add_argument("--context", type=int, default=128, help="KV slots filled before the iteration (default 128)")
    args = parser.parse_args()

    print(f"batch {args.batch}, context {args.context}; milliseconds per iteration, predicted")
    print()
    print("| model shape | GPU | HBM floor | megakernel, static | megakernel, dynamic | kernel per operator | CUDA graph + PDL |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for preset in args.preset or PRESETS:
        for gpu in args.gpu or ["a100", "h100", "h200", "b200"]:
            if gpu not in gpu_names():
                parser.error(f"unknown GPU {gpu!r}; use one of {', '.join(gpu_names())}")
            report = simulate_config(get_preset(preset), Scenario(gpu, args.batch, args.context))
            cells = " | ".join(f"{p.seconds * 1e3:.3f}" for p in report.predictions)
            print(f"| {preset} | {gpu_spec(gpu).part} | {report.floor.seconds * 1e3:.3f} | {cells} |")


if __name__ == "__main__":
    main()
