"""CUDA code generation and ptxas statistics, without a GPU."""

from __future__ import annotations

import re

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


def switch_cases(source: str, function: str) -> dict[int, str]:
    """The statement of each case of the switch in ``function`` of a generated source."""
    body = source.split(f"__device__ void {function}(", 1)[1].split("\n}\n", 1)[0]
    return {int(number): statement.strip() for number, statement in re.findall(r"case (\d+):[^\n]*\n(.*?)\n\s*break;", body, re.S)}


def weight_buffers(statement: str) -> list[int]:
    return [int(index) for index in re.findall(r"static_cast<const __nv_bfloat16\*>\(buffers\[(\d+)\]\)", statement)]


@pytest.mark.parametrize("tokens", [1, 16])
def test_linear_prefetch_pairs_with_staged_task(tokens) -> None:
    """Each linear task's prefetch issues the first cp.async chunks of its weight, and
    its run call is the STAGED linear_task with the same shape and weight.
    """
    target = gpu_target("h100")
    tg = compile_graph(decoder_graph(model_configs()["qwen3-tiny"], tokens, 128, target), target)
    source = generate_source(tg)
    runs, prefetches = switch_cases(source, "run_task"), switch_cases(source, "prefetch_task")
    linear = {number: op for number, op in enumerate(tg.graph.ops) if op.kind == "linear"}

    assert linear
    assert set(prefetches) == set(linear)
    for number, op in linear.items():
        x_tokens, features = tg.graph.tensors[op.inputs["x"]].shape
        prefetch, run = prefetches[number], runs[number]
        assert prefetch.startswith(f"mpk::cuda::linear_prefetch<{x_tokens}, {features}>("), prefetch
        assert prefetch.endswith("tile[0], tile[1], smem);"), prefetch
        assert re.match(rf"mpk::cuda::linear_task<{x_tokens}, {features}, \d+, [\w:]+, (true|false), true>\(", run), run
        # The prefetch's only pointer is the weight, linear_task's second argument.
        assert weight_buffers(prefetch) == weight_buffers(run)[1:2], (prefetch, run)


def test_logits_stay_float_on_gpu(qwen3_graph) -> None:
    dtypes = buffer_dtypes(qwen3_graph)

    assert dtypes["lm_head.out"] == "float32"
    assert dtypes["rope.cos"] == "float32"
    assert dtypes["layers.0.qkv_proj"] == "bfloat16"
    assert dtypes["tokens"] == "int64"


def test_encoder_source_adds_bias_after_a_barrier() -> None:
    from mpk.backends.cuda.compile_check import minilm_graph

    target = gpu_target("h100")
    tg = compile_graph(minilm_graph(64, 4), target)
    source = generate_source(tg)
    cases = switch_cases(source, "run_task")
    for number, op in enumerate(tg.graph.ops):
        if op.kind != "linear":
            continue
        run = cases[number]
        # The epilogue reads elements other threads stored: the barrier must come first.
        assert run.index("linear_task<") < run.index("__syncthreads();") < run.index("bias_activation_task<"), run
        activation = "gelu" if op.name.endswith("intermediate.dense") else "none"
        assert f"mpk::cuda::Activation::{activation}>" in run
    dtypes = buffer_dtypes(tg)
    assert dtypes[tg.placement.home["pool.out"]] == "float32", "pooled embeddings stay fp32 for the host"
