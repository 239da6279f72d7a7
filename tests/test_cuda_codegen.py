"""CUDA code generation and ptxas statistics, without a GPU."""

from __future__ import annotations

import pytest

from mpk.backends.cpu.build import BuildError
from mpk.backends.cuda.build import cuda_toolchain, parse_ptxas
from mpk.backends.cuda.codegen import buffer_dtypes, generate_source
from mpk.backends.cuda.compile_check import test_model_configs as model_configs
from mpk.compiler.pipeline import compile_graph
from mpk.frontend.decoder import decoder_graph
from mpk.target import gpu_target

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN3mpk4cuda10megakernelIXadL_Z8run_taskEEXadL_Z13prefetch_taskEEEEvNS0_12DeviceConfigEm' for 'sm_90a'
ptxas info    : Function properties for _ZN3mpk4cuda10megakernel
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 143 registers, used 1 barriers, 16 bytes smem, 456 bytes cmem[0]
"""


def test_parse_ptxas_reads_megakernel_line() -> None:
    stats = parse_ptxas(PTXAS_LOG, "megakernel")

    assert stats.registers == 143
    assert stats.shared_bytes == 16
    assert stats.spill_stores == 8
    assert stats.spill_loads == 12
    assert stats.stack_bytes == 24


def test_parse_ptxas_missing_function() -> None:
    with pytest.raises(BuildError, match="no ptxas statistics"):
        parse_ptxas(PTXAS_LOG, "other_kernel")


def test_unsupported_architecture() -> None:
    with pytest.raises(BuildError, match="sm_75"):
        cuda_toolchain("sm_75")


@pytest.fixture(scope="module")
def qwen3_graph():
    target = gpu_target("h100")
    return compile_graph(decoder_graph(model_configs()["qwen3-tiny"], 1, 128, target), target)


def test_source_calls_every_operator(qwen3_graph) -> None:
    source = generate_source(qwen3_graph)

    for number, op in enumerate(qwen3_graph.graph.ops):
        assert f"case {number}:  // {op.name}" in source
    assert source.count("mpk::cuda::prefetch_l2") == sum(op.kind == "linear" for op in qwen3_graph.graph.ops)


def test_logits_stay_float_on_gpu(qwen3_graph) -> None:
    dtypes = buffer_dtypes(qwen3_graph)

    assert dtypes["lm_head.out"] == "float32"
    assert dtypes["rope.cos"] == "float32"
    assert dtypes["layers.0.qkv_proj"] == "bfloat16"
    assert dtypes["tokens"] == "int64"
