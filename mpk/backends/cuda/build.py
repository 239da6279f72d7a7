"""nvcc builds of the megakernel, one library per GPU architecture, and their ptxas statistics."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mpk.backends.cpu.build import BuildError, Toolchain, build_library, build_log

HERE = Path(__file__).resolve().parent
INCLUDE_DIRS = (HERE / "include", HERE.parent.parent / "runtime" / "include")

# Compute capability -> the architecture the megakernel is built for. The "a" targets
# unlock the architecture-specific features (TMA multicast, WGMMA, tcgen05).
ARCHITECTURES = {(8, 0): "sm_80", (8, 6): "sm_80", (8, 9): "sm_80", (9, 0): "sm_90a", (10, 0): "sm_100a"}
SUPPORTED_ARCHS = ("sm_80", "sm_90a", "sm_100a")


def nvcc() -> str:
    name = os.environ.get("NVCC", "nvcc")
    path = shutil.which(name) or (name if Path(name).is_file() else None)
    if path is None:
        raise BuildError(f"nvcc not found (looked for {name!r} on PATH); install the CUDA toolkit or set NVCC")
    return path


def cuda_toolchain(arch: str) -> Toolchain:
    if arch not in SUPPORTED_ARCHS:
        raise BuildError(f"unsupported GPU architecture {arch!r}; mpk builds for {', '.join(SUPPORTED_ARCHS)}")
    options = (
        "-std=c++20", "-O3", f"-arch={arch}", "--shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo",
        *(f"-I{d}" for d in INCLUDE_DIRS),
    )
    return Toolchain(f"cuda-{arch}", nvcc(), options, ".cu", INCLUDE_DIRS)


def build_megakernel(source: str, arch: str) -> Path:
    return build_library(source, toolchain=cuda_toolchain(arch))


@dataclass(frozen=True)
class PtxasStats:
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def megakernel_stats(library: Path) -> PtxasStats:
    """ptxas statistics of the megakernel entry point in ``library``'s build log."""
    return parse_ptxas(build_log(library), "megakernel")


def parse_ptxas(log: str, function: str) -> PtxasStats:
    """Read the `ptxas info` lines that follow `Compiling entry function '...function...'`."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Compiling entry function" in line and function in line:
            block = " ".join(lines[i + 1 : i + 4])
            number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, block)) else 0  # noqa: E731
            return PtxasStats(
                registers=number(r"Used (\d+) registers"),
                shared_bytes=number(r"(\d+) bytes smem"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                stack_bytes=number(r"(\d+) bytes stack frame"),
            )
    raise BuildError(f"no ptxas statistics for an entry function named like {function!r} in the build log")
