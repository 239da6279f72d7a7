"""The GPU simulator: hand-computed timelines of small workloads, the four execution
models, costs and the memory floor of compiled graphs, the GPU table, and `mpk simulate`.

Hand-built workloads use round numbers as seconds, so every expected time can be checked
on paper; events are listed as (wait, signal) per task.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mpk.cli import main
from mpk.compiler.pipeline import compile_graph
from mpk.errors import CompileError, SimulationError
from mpk.frontend.decoder import decoder_graph
from mpk.frontend.presets import get_preset
from mpk.ir.builder import GraphBuilder
from mpk.ops import spec_of
from mpk.ops.base import Op
from mpk.ir.tensor import TensorKind, TensorSpec
from mpk.sim.costs import device_tensors, memory_floor, workload_from_taskgraph
from mpk.sim.engine import run_dynamic, run_static
from mpk.sim.models import (
    CUDA_GRAPH_PDL, KERNEL_PER_OPERATOR, MEGAKERNEL_DYNAMIC, MEGAKERNEL_STATIC, ExecutionCosts,
    cuda_graph_pdl, kernel_per_operator, kernel_waves, megakernel_static, predict_all,
)
from mpk.sim.predict import Scenario, simulate_config
from mpk.sim.workload import Workload
from mpk.target import Target, cpu_target, gpu_names, gpu_spec, gpu_target

# Launch costs with distinct round values, so each term is visible in a total.
COSTS = ExecutionCosts(host_launch=1.0, kernel_gap=0.5, pdl_gap=0.1, kernel_prologue=0.25,
                       event_latency=0.5, dispatch_latency=0.25)
LAUNCH = 1.0 + 0.5 + 0.25   # host_launch + kernel_gap + kernel_prologue


def workload(seconds: list[float], events: list[tuple[int, int]], worker: list[int], workers: int,
             kernel: list[int] | None = None, prefetch: list[float] | None = None) -> Workload:
    num_events = 1 + max(max(pair) for pair in events)
    num_triggers = [1] + [sum(1 for _, s in events if s == e) for e in range(1, num_events)]
    return Workload(
        seconds=seconds, wait=[w for w, _ in events], signal=[s for _, s in events], worker=worker,
        kernel=kernel if kernel is not None else list(range(len(seconds))), num_triggers=num_triggers,
        workers=workers, prefetch=prefetch or [],
    )


# --- hand-computed workloads ------------------------------------------------------------


def chain() -> Workload:
    """t0 (2 s) -> t1 (3 s) -> t2 (4 s), on workers 0, 1, 0; one operator each."""
    return workload([2.0, 3.0, 4.0], [(0, 1), (1, 2), (2, 3)], worker=[0, 1, 0], workers=2)


def test_chain_static_adds_event_latency() -> None:
    timeline = run_static(chain(), event_latency=0.5)

    # t0 [0, 2]; t1 waits for 2 + 0.5; t2 for 5.5 + 0.5.
    assert timeline.start == pytest.approx([0.0, 2.5, 6.0])
    assert timeline.end == pytest.approx([2.0, 5.5, 10.0])
    assert timeline.makespan == pytest.approx(10.0)


def test_chain_dynamic_uses_earliest_free_worker() -> None:
    timeline = run_dynamic(chain(), dispatch_latency=0.25)

    # t1 goes to worker 1 (free since 0), t2 to worker 0 (free since 2).
    assert timeline.worker == [0, 1, 0]
    assert timeline.start == pytest.approx([0.0, 2.25, 5.5])
    assert timeline.makespan == pytest.approx(9.5)


def test_chain_kernel_per_operator_serializes_launches() -> None:
    prediction = kernel_per_operator(chain(), COSTS)

    # Kernel i is issued at i + 1 and starts 0.75 after max(issue, previous end):
    # [1.75, 3.75], [4.5, 7.5], [8.25, 12.25].
    assert prediction.model == KERNEL_PER_OPERATOR
    assert prediction.seconds == pytest.approx(12.25)


def test_chain_cuda_graph_pdl_pays_pdl_gap() -> None:
    prediction = cuda_graph_pdl(chain(), COSTS)

    # [1.75, 3.75], then 0.1 after each end: [3.85, 6.85], [6.95, 10.95].
    assert prediction.model == CUDA_GRAPH_PDL
    assert prediction.seconds == pytest.approx(10.95)


def test_chain_megakernel_pays_one_launch() -> None:
    prediction = megakernel_static(chain(), COSTS)

    assert prediction.model == MEGAKERNEL_STATIC
    assert prediction.seconds == pytest.approx(LAUNCH + 10.0)


def test_kernel_issue_bound_by_host() -> None:
    """Kernels shorter than a host launch leave the GPU waiting for the host."""
    costs = dataclasses.replace(COSTS, host_launch=4.0, kernel_gap=0.0, kernel_prologue=0.0)
    work = workload([1.0, 1.0, 1.0], [(0, 1), (1, 2), (2, 3)], worker=[0, 0, 0], workers=1)

    # Issued at 4, 8, 12; each runs 1.
    assert kernel_per_operator(work, costs).seconds == pytest.approx(13.0)


def one_operator(tasks: int, workers: int) -> Workload:
    """``tasks`` independent 1 s tasks of one operator, dealt round-robin."""
    return workload([1.0] * tasks, [(0, 1)] * tasks, worker=[t % workers for t in range(tasks)],
                    workers=workers, kernel=[0] * tasks)


@pytest.mark.parametrize(("tasks", "waves"), [(4, 1), (5, 2), (8, 2), (9, 3)])
def test_operator_waves_on_four_workers(tasks: int, waves: int) -> None:
    assert kernel_waves(one_operator(tasks, 4)) == pytest.approx([float(waves)])


def test_wave_tail_costs_a_whole_wave() -> None:
    """One task more than SMs doubles the kernel: 5 tasks on 4 SMs take as long as 8."""
    five = kernel_per_operator(one_operator(5, 4), COSTS).seconds
    eight = kernel_per_operator(one_operator(8, 4), COSTS).seconds

    assert five == pytest.approx(1.0 + 0.5 + 0.25 + 2.0)
    assert eight == pytest.approx(five)


def test_wave_tail_in_megakernel() -> None:
    work = one_operator(5, 4)

    assert run_static(work, event_latency=0.5).makespan == pytest.approx(2.0)
    assert run_dynamic(work, dispatch_latency=0.25).makespan == pytest.approx(2.0)


def diamond() -> Workload:
    """A (1 s) -> B (2 s) and C (5 s) -> D (1 s); A, B, D on worker 0, C on worker 1."""
    return workload([1.0, 2.0, 5.0, 1.0], [(0, 1), (1, 2), (1, 2), (2, 3)], worker=[0, 0, 1, 0], workers=2)


def test_diamond_static_overlaps_branches() -> None:
    timeline = run_static(diamond(), event_latency=0.5)

    # B and C both start at 1.5; D waits for C's end 6.5 + 0.5.
    assert timeline.start == pytest.approx([0.0, 1.5, 1.5, 7.0])
    assert timeline.makespan == pytest.approx(8.0)


def test_diamond_dynamic_matches_static() -> None:
    timeline = run_dynamic(diamond(), dispatch_latency=0.5)

    # B goes to worker 1 (free at 0), C to worker 0 (free at 1), D to worker 1 (free at 3.5).
    assert timeline.worker == [0, 1, 0, 1]
    assert timeline.makespan == pytest.approx(8.0)


def test_diamond_kernels_serialize_branches() -> None:
    """Per operator, B and C cannot overlap: 1 + 2 + 5 + 1 plus a launch each."""
    assert kernel_waves(diamond()) == pytest.approx([1.0, 2.0, 5.0, 1.0])
    # Each kernel starts 0.75 after the previous end (all issued earlier): ends 2.75, 5.5, 11.25, 13.
    assert kernel_per_operator(diamond(), COSTS).seconds == pytest.approx(13.0)


def unlucky_assignment() -> Workload:
    """t0 (10 s) and t1 (1 s) start at once; t2 (1 s) needs t1 but sits behind t0 on worker 0."""
    return workload([10.0, 1.0, 1.0], [(0, 2), (0, 1), (1, 2)], worker=[0, 1, 0], workers=2)


def test_static_assignment_loses_to_dynamic() -> None:
    work = unlucky_assignment()

    static = run_static(work, event_latency=0.0)
    dynamic = run_dynamic(work, dispatch_latency=0.0)

    assert static.makespan == pytest.approx(11.0)
    assert dynamic.makespan == pytest.approx(10.0)
    assert dynamic.worker[2] == 1


def test_prefetch_overlaps_wait() -> None:
    """t1 (3 s, 2 s of them weight loads) waits for t0 (4 s) on another worker."""
    work = workload([4.0, 3.0], [(0, 1), (1, 2)], worker=[0, 1], workers=2, prefetch=[0.0, 2.0])

    with_prefetch = run_static(work, event_latency=0.5, prefetch=True)
    without = run_static(work, event_latency=0.5, prefetch=False)

    assert with_prefetch.end[1] == pytest.approx(4.5 + 1.0)
    assert without.end[1] == pytest.approx(4.5 + 3.0)


def test_prefetch_limited_by_idle_time() -> None:
    """A worker busy until 4 can prefetch only during its 0.5 s of idle time."""
    work = workload([4.0, 4.0, 3.0], [(0, 2), (0, 1), (1, 2)], worker=[0, 1, 1], workers=2, prefetch=[0.0, 0.0, 2.0])

    # t1 ends at 4 on worker 1 and signals event 1, ready at 4.5; t2 prefetches 0.5 s.
    timeline = run_static(work, event_latency=0.5)

    assert timeline.end[2] == pytest.approx(4.5 + 3.0 - 0.5)


def test_predict_all_runs_four_models() -> None:
    names = [p.model for p in predict_all(diamond(), COSTS)]

    assert names == [MEGAKERNEL_STATIC, MEGAKERNEL_DYNAMIC, KERNEL_PER_OPERATOR, CUDA_GRAPH_PDL]


# --- invalid workloads ------------------------------------------------------------------


def test_static_deadlock_is_reported() -> None:
    """Worker 0 has t0, which waits on t1's event, ahead of t1 itself."""
    work = workload([1.0, 1.0], [(1, 2), (0, 1)], worker=[0, 0], workers=1)

    with pytest.raises(SimulationError, match="deadlocks: worker 0 waits forever at task 0 on event 1"):
        run_static(work, event_latency=0.0)
    assert run_dynamic(work, dispatch_latency=0.0).makespan == pytest.approx(2.0)


def test_wrong_trigger_count_is_rejected() -> None:
    with pytest.raises(SimulationError, match="event 1 needs 2 triggers but 1 tasks signal it"):
        Workload(seconds=[1.0, 1.0], wait=[0, 1], signal=[1, 2], worker=[0, 0], kernel=[0, 1],
                 num_triggers=[1, 2, 1], workers=1)


def test_worker_out_of_range_is_rejected() -> None:
    with pytest.raises(SimulationError, match="task 0 is assigned to worker 3; use 0 to 1"):
        workload([1.0], [(0, 1)], worker=[3], workers=2)


def test_prefetch_longer_than_task_is_rejected() -> None:
    with pytest.raises(SimulationError, match="prefetches for 2.0 s of its 1.0 s"):
        workload([1.0], [(0, 1)], worker=[0], workers=1, prefetch=[2.0])


# --- the cost function and the GPU table ------------------------------------------------


def test_task_seconds_is_derated_roofline() -> None:
    target = Target("t", "gpu", workers=4, memory_bandwidth=100.0, peak_flops=1000.0, task_overhead=0.5,
                    event_latency=0.0, min_columns=1, sustained_fraction=0.5)

    # Per worker: 100 * 0.5 / 4 = 12.5 bytes/s and 125 flop/s.
    assert target.task_seconds(25, 0) == pytest.approx(0.5 + 2.0)
    assert target.task_seconds(25, 500) == pytest.approx(0.5 + 4.0)


def test_sustained_fraction_out_of_range_is_rejected() -> None:
    with pytest.raises(CompileError, match=r"sustained_fraction=1.5; use a fraction of the peak rates in \(0, 1\]"):
        dataclasses.replace(gpu_target("h100"), sustained_fraction=1.5)


def test_target_file_without_new_fields_loads() -> None:
    old = {k: v for k, v in gpu_target("h100").to_dict().items() if k not in ("sustained_fraction", "l2_bytes", "clock_hz")}

    assert Target.from_dict(old).sustained_fraction == 1.0


# Dense BF16 flop per clock per SM: 1024 FMA on A100; twice that on Hopper, again on Blackwell.
FLOPS_PER_CLOCK = {"a100": 2048, "h100": 4096, "h200": 4096, "b200": 8192}


@pytest.mark.parametrize("name", sorted(FLOPS_PER_CLOCK))
def test_gpu_flops_match_sms_and_clock(name: str) -> None:
    spec = gpu_spec(name)

    assert spec.sms * FLOPS_PER_CLOCK[name] * spec.clock_hz == pytest.approx(spec.bf16_dense_flops, rel=0.01)


def test_gpu_table_lists_four_parts() -> None:
    assert gpu_names() == ["a100", "b200", "h100", "h200"]
    assert gpu_target("h200").workers == 132
    assert gpu_target("b200").memory_bandwidth == 8000e9


# --- compiled task graphs ---------------------------------------------------------------


def reduced(name: str, layers: int = 2):
    return dataclasses.replace(get_preset(name), num_layers=layers)


def small_graph(tokens: int = 2):
    b = GraphBuilder("small", tokens)
    ids = b.input("tokens", (tokens,), "int64")
    x = b.embedding(ids, b.weight("embed", (64, 32)))
    normed = b.rmsnorm(x, b.weight("norm", (32,)), 1e-6, name="norm")
    up = b.linear(normed, b.weight("up", (96, 32)), name="up")
    b.mark_output(b.linear(up, b.weight("down", (32, 96)), name="down", residual=x, out=x))
    return b.build()


def test_simulator_uses_compiler_costs_on_cpu() -> None:
    """On a CPU target the simulator gets the compiler's tensors, so its durations are the
    compiler's estimates exactly: both come from Target.task_seconds.
    """
    tg = compile_graph(small_graph(), cpu_target(3))

    work = workload_from_taskgraph(tg)

    assert work.seconds == tg.seconds
    assert work.prefetch == []


def test_static_timeline_respects_events() -> None:
    target = gpu_target("a100")
    tg = compile_graph(decoder_graph(reduced("qwen3-0.6b", layers=1), 3, 64, target), target)
    work = workload_from_taskgraph(tg)
    latency = 1e-6

    timeline = run_static(work, latency)

    fired = [0.0] * work.num_events
    for task in range(work.num_tasks):
        fired[work.signal[task]] = max(fired[work.signal[task]], timeline.end[task])
    for task in range(work.num_tasks):
        if work.wait[task] != 0:
            assert timeline.start[task] >= fired[work.wait[task]] + latency - 1e-12
    by_worker: dict[int, list[int]] = {}
    for task in range(work.num_tasks):
        by_worker.setdefault(timeline.worker[task], []).append(task)
    for tasks in by_worker.values():
        for before, after in zip(tasks, tasks[1:]):
            assert timeline.start[after] >= timeline.end[before] - 1e-12


PRESETS = ["qwen3-0.6b", "llama-3.2-1b", "qwen3-8b"]


@pytest.mark.parametrize("gpu", sorted(FLOPS_PER_CLOCK))
@pytest.mark.parametrize("preset", PRESETS)
def test_megakernel_never_beats_memory_floor(preset: str, gpu: str) -> None:
    report = simulate_config(reduced(preset), Scenario(gpu, batch=1, context=512))

    for prediction in report.predictions:
        assert prediction.seconds >= report.floor.seconds, prediction.model


def test_memory_floor_counts_weights_and_kv() -> None:
    cfg = reduced("qwen3-0.6b")
    tokens, context = 2, 100
    target = gpu_target("h100")
    tg = compile_graph(decoder_graph(cfg, tokens, context + tokens, target), target)

    floor = memory_floor(tg, device_tensors(tg), context, target.memory_bandwidth)

    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = 2 * h + (q + 2 * kv) * h + 2 * d + h * q + 2 * i * h + h * i   # bf16 elements
    bf16 = cfg.num_layers * per_layer + h + cfg.vocab_size * h + tokens * h    # + final norm, lm_head, embedding rows
    rope_tables = 2 * tokens * d * 4                                           # fp32 cos and sin rows
    assert floor.weight_bytes == 2 * bf16 + rope_tables
    assert floor.kv_bytes == cfg.num_layers * 2 * (context + tokens) * kv * 2
    assert floor.seconds == pytest.approx(floor.total_bytes / 3350e9)


def test_memory_floor_of_split_decode_attention() -> None:
    # The fused and the split decode attention read the same cache slots and rope rows.
    cfg = reduced("qwen3-0.6b")
    context = 300
    target = gpu_target("h100")
    floors = {}
    for splits in (1, 4):
        tg = compile_graph(decoder_graph(cfg, 1, 1024, target, attention_splits=splits), target)
        kinds = {op.kind for op in tg.graph.ops}
        assert ("split_attention" in kinds) == (splits > 1)
        floors[splits] = memory_floor(tg, device_tensors(tg), context, target.memory_bandwidth)

    assert floors[4].kv_bytes == cfg.num_layers * 2 * (context + 1) * cfg.num_kv_heads * cfg.head_dim * 2
    assert floors[4].kv_bytes == floors[1].kv_bytes
    assert floors[4].weight_bytes == floors[1].weight_bytes


def test_attention_cost_follows_context() -> None:
    spec = spec_of("attention")
    tensors = {
        "qkv": TensorSpec("qkv", (4, 16 * 4), "bfloat16", TensorKind.ACTIVATION),
        "positions": TensorSpec("positions", (4,), "int64", TensorKind.INPUT),
        "k": TensorSpec("k", (256, 1, 16), "bfloat16", TensorKind.STATE),
        "v": TensorSpec("v", (256, 1, 16), "bfloat16", TensorKind.STATE),
        "out": TensorSpec("out", (4, 32), "bfloat16", TensorKind.ACTIVATION),
    }
    op = Op("attention", "attn", {"qkv": "qkv", "positions": "positions", "k_cache": "k", "v_cache": "v"}, {"out": "out"},
            {"num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "scale": 0.25, "context": 100})

    cost = spec.cost(op, tensors, (0, 1, 3))

    # Rows 1 and 2 attend to 102 and 103 slots; the tile streams 103 slots of k and v.
    assert cost.bytes == 2 * 103 * 16 * 2 + 2 * (2 * 2 * 16 * 2)
    assert cost.flops == 4 * (102 + 103) * 2 * 16


def test_longer_context_is_slower() -> None:
    cfg = reduced("llama-3.2-1b")
    short = simulate_config(cfg, Scenario("h100", context=128))
    long = simulate_config(cfg, Scenario("h100", context=8192))

    assert long.floor.kv_bytes > short.floor.kv_bytes
    for a, b in zip(short.predictions, long.predictions):
        assert b.seconds > a.seconds, a.model


# --- mpk simulate -----------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_simulate_prints_models_and_floor(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "sim.json"

    code, out, _ = run(capsys, "simulate", qwen3_dir, "--gpu", "h100", "--context", 32, "--trace", trace)

    assert code == 0
    assert "HBM floor:" in out
    assert "PREDICTED by the simulator, not measured" in out
    for name in (MEGAKERNEL_STATIC, MEGAKERNEL_DYNAMIC, KERNEL_PER_OPERATOR, CUDA_GRAPH_PDL):
        assert name in out
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = [e for e in events if e["name"] == "thread_name"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(tracks) == 132
    assert slices
    assert len(slices) == len({e["args"]["task"] for e in slices})
    assert all(e["dur"] > 0 for e in slices)


def test_cli_simulate_preset(capsys) -> None:
    code, out, _ = run(capsys, "simulate", "--preset", "qwen3-0.6b", "--gpu", "b200", "--batch", 2, "--sustained-fraction", 0.8)

    assert code == 0
    assert "B200" in out
    assert "batch 2, context 128 KV slots, sustained fraction 0.80" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu", "h100"], "missing model: pass MODEL_DIR or --preset NAME"),
    (["--preset", "qwen3-0.6b", "--gpu", "h100", "--batch", 0], "--batch must be at least 1, got 0"),
    (["--preset", "qwen3-0.6b", "--gpu", "h100", "--context", -1], "--context must be 0 or more"),
    (["--preset", "llama-3.2-1b", "--gpu", "h100", "--context", 131072], "exceeds the model's max_position_embeddings=131072"),
    (["--preset", "qwen3-0.6b", "--gpu", "h100", "--sustained-fraction", 0], "sustained_fraction=0.0"),
])
def test_cli_simulate_rejects_bad_input(capsys, args: list, message: str) -> None:
    code, _, err = run(capsys, "simulate", *args)

    assert code == 2
    assert err.startswith("error: ")
    assert message in err
