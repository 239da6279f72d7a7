"""Compile time of model-shaped configs, from config alone (no weights).

    python benchmarks/compile_time.py [--preset qwen3-8b] [--target h200] [--repeat 3]

Prints the best wall time of each compiler pass over the repeats, and the graph size.
"""

from __future__ import annotations

import argparse
import platform
import time

from mpk.compiler.pipeline import compile_graph
from mpk.frontend.decoder import decoder_graph
from mpk.frontend.presets import get_preset
from mpk.target import make_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="model shape (repeatable; default qwen3-8b and qwen3-0.6b)")
    parser.add_argument("--target", action="append", help="cpu or a GPU name (repeatable; default h200 and cpu)")
    parser.add_argument("--workers", type=int, default=None, help="workers for the cpu target (default: all cores)")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per iteration (default 1)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="KV cache slots (default 4096)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported (default 3)")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    header = f"{'model':12s} {'target':8s} {'tasks':>7s} {'events':>7s} {'total s':>8s}  passes (s)"
    print(header)
    for preset in args.preset or ["qwen3-8b", "qwen3-0.6b"]:
        for target_name in args.target or ["h200", "cpu"]:
            cfg = get_preset(preset)
            target = make_target(target_name, args.workers if target_name == "cpu" else None)
            best, tg = float("inf"), None
            for _ in range(args.repeat):
                start = time.perf_counter()
                tg = compile_graph(decoder_graph(cfg, args.tokens, args.max_seq_len, target), target)
                best = min(best, time.perf_counter() - start)
            passes = " ".join(f"{k}={v:.2f}" for k, v in tg.stats["compile_seconds"].items())
            print(f"{preset:12s} {target.name:8s} {tg.num_tasks:7d} {tg.num_events:7d} {best:8.2f}  {passes}")


if __name__ == "__main__":
    main()
