"""Memory bandwidth of the CPU linear kernel in decode shape (T=1), beside copy bandwidth.

    python benchmarks/cpu_kernels.py [--k 1024] [--n 3072] [--define MPK_FORCE_AVX2]

Builds a small shim around mpk::cpu::linear_task<1, K, N, W, false> for float32 and bf16
weights and times whole-matrix calls (c0=0, c1=N) on one thread:

  hot   the same weight every call, so it stays in cache when it fits (a float32
        1024 x 3072 matrix is 12 MB)
  DRAM  a different copy of the weight each call, cycling through at least 256 MB, so
        every call streams its weight from memory

GB/s counts the weight bytes read per call. Copy bandwidth is torch's ``b.copy_(a)`` on a
256 MB float32 tensor, counting bytes read plus bytes written, with one thread and with
torch's default thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

INCLUDE_DIR = Path(__file__).resolve().parent.parent / "mpk" / "backends" / "cpu" / "include"
WEIGHT_TYPES = {"float32": ("float", torch.float32), "bfloat16": ("mpk::bf16", torch.bfloat16)}
STREAM_BYTES = 256 * 1024 * 1024


def build_shim(k: int, n: int, defines: list[str], directory: Path) -> ctypes.CDLL:
    compiler = shutil.which("c++")
    if compiler is None:
        raise SystemExit("c++ was not found on PATH; install g++ 12 or newer to build the kernel shim")
    lines = ['#include "mpk_cpu_kernels.h"', 'extern "C" int simd_width() { return mpk::cpu::simd::kWidth; }']
    for name, (ctype, _) in WEIGHT_TYPES.items():
        lines.append(
            f'extern "C" void linear_{name}(const float* x, const void* w, float* out) '
            f"{{ mpk::cpu::linear_task<1, {k}, {n}, {ctype}, false>(x, static_cast<const {ctype}*>(w), nullptr, out, 0, {n}); }}"
        )
    source = directory / "bench.cpp"
    source.write_text("\n".join(lines) + "\n")
    output = directory / "bench.so"
    command = [compiler, "-O2", "-std=c++20", "-shared", "-fPIC", "-march=native", *(f"-D{d}" for d in defines),
               f"-I{INCLUDE_DIR}", str(source), "-o", str(output)]
    subprocess.run(command, check=True)
    library = ctypes.CDLL(str(output))
    library.simd_width.restype = ctypes.c_int
    for name in WEIGHT_TYPES:
        function = getattr(library, f"linear_{name}")
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        function.restype = None
    return library


def time_linear(function, x: torch.Tensor, weights: list[torch.Tensor], out: torch.Tensor, calls: int, rounds: int) -> float:
    """Return the median seconds per call over `rounds` rounds of `calls` calls."""
    x_ptr, out_ptr = x.data_ptr(), out.data_ptr()
    pointers = [w.data_ptr() for w in weights]
    for p in pointers:  # warm-up: page in every copy
        function(x_ptr, p, out_ptr)
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            function(x_ptr, pointers[i % len(pointers)], out_ptr)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def copy_bandwidth(threads: int, rounds: int) -> float:
    """Return GB/s of b.copy_(a) on 256 MB, counting bytes read plus bytes written."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(STREAM_BYTES // 4)
        b = torch.empty_like(a)
        b.copy_(a)
        best = []
        for _ in range(rounds):
            start = time.perf_counter()
            b.copy_(a)
            best.append(time.perf_counter() - start)
        return 2 * STREAM_BYTES / statistics.median(best) / 1e9
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024, help="input features K (default 1024)")
    parser.add_argument("--n", type=int, default=3072, help="output features N (default 3072)")
    parser.add_argument("--define", action="append", default=[], help="preprocessor macro for the shim, e.g. MPK_FORCE_AVX2 (repeatable)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; the median is reported (default 7)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        library = build_shim(args.k, args.n, args.define, Path(directory))
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}")
        print(f"linear_task<T=1, K={args.k}, N={args.n}>, SIMD width {library.simd_width()}, one thread")
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((1, args.k), generator=generator)
        out = torch.empty((1, args.n))
        for name, (_, dtype) in WEIGHT_TYPES.items():
            weight = torch.randn((args.n, args.k), generator=generator).to(dtype)
            weight_bytes = weight.numel() * weight.element_size()
            copies = [weight] + [weight.clone() for _ in range(-(-STREAM_BYTES // weight_bytes) - 1)]
            function = getattr(library, f"linear_{name}")
            hot = time_linear(function, x, [weight], out, calls=50, rounds=args.rounds)
            cold = time_linear(function, x, copies, out, calls=len(copies), rounds=args.rounds)
            print(f"  {name:9s} weight {weight_bytes / 1e6:5.1f} MB  hot {weight_bytes / hot / 1e9:6.1f} GB/s "
                  f"({hot * 1e6:7.1f} us)  DRAM {weight_bytes / cold / 1e9:6.1f} GB/s ({cold * 1e6:7.1f} us)")
            del copies
        print("copy b.copy_(a), 256 MB float32, bytes read + written:")
        print(f"  1 thread  {copy_bandwidth(1, args.rounds):6.1f} GB/s")
        threads = torch.get_num_threads()
        print(f"  {threads} threads {copy_bandwidth(threads, args.rounds):6.1f} GB/s")


if __name__ == "__main__":
    main()
