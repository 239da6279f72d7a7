"""The compiler's output: tiles, events, the static assignment, the file format, and a
graph built by hand with GraphBuilder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_models import odd_config, single_torch_thread  # noqa: F401 (fixture)
from mpk.compiler.events import ancestor_sets
from mpk.compiler.hazards import find_dependencies
from mpk.compiler.memory import plan_memory
from mpk.compiler.pipeline import CompileOptions, compile_graph
from mpk.compiler.taskgraph import TaskGraph, load_task_graph
from mpk.compiler.tasks import make_tasks
from mpk.compiler.verify import verify
from mpk.errors import VerificationError
from mpk.frontend.checkpoint import Checkpoint
from mpk.frontend.config import ModelConfig, load_config
from mpk.frontend.decoder import decoder_graph
from mpk.frontend.presets import get_preset
from mpk.ir.builder import GraphBuilder
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorKind
from mpk.ops import spec_of
from mpk.ops.base import role_tensor
from mpk.runtime.reference import ReferenceExecutor
from mpk.runtime.weights import load_weights
from mpk.target import Target, cpu_target, make_target

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_SEQ_LEN = 64
WORKERS = [1, 7, 64]


def compile_decoder(cfg: ModelConfig, tokens: int, target: Target, options: CompileOptions = CompileOptions()) -> TaskGraph:
    return compile_graph(decoder_graph(cfg, tokens, MAX_SEQ_LEN, target), target, options)


@pytest.fixture(scope="module", params=[(w, t) for w in WORKERS for t in (1, 5)], ids=lambda p: f"w{p[0]}-t{p[1]}")
def odd_graph(request: pytest.FixtureRequest) -> TaskGraph:
    """Hidden 72, intermediate 200, vocab 1000: no width is a multiple of 16."""
    workers, tokens = request.param
    return compile_decoder(odd_config(), tokens, cpu_target(workers))


# --- tiling -----------------------------------------------------------------------------


def write_counts(tg: TaskGraph) -> dict[tuple[str, str], np.ndarray]:
    """Per (operator, output tensor): how many tasks write each element."""
    counts: dict[tuple[str, str], np.ndarray] = {}
    for index, op in enumerate(tg.graph.ops):
        for name in op.outputs.values():
            counts[(op.name, name)] = np.zeros(tg.graph.tensors[name].shape, dtype=np.int64)
    for t in range(tg.num_tasks):
        if tg.op[t] < 0:
            continue
        op = tg.graph.ops[tg.op[t]]
        for access in spec_of(op.kind).accesses(op, tg.graph.tensors, tg.tile[t]):
            if access.write:
                counts[(op.name, role_tensor(op, access.role))][tuple(slice(lo, hi) for lo, hi in access.box)] += 1
    return counts


def is_fresh_output(graph: OpGraph, op_name: str, tensor: str) -> bool:
    """True unless the operator updates the tensor in place or it is persistent state."""
    op = next(o for o in graph.ops if o.name == op_name)
    if graph.tensors[tensor].kind is TensorKind.STATE:
        return False
    return tensor not in op.inputs.values()


def test_tiles_write_each_element_once(odd_graph: TaskGraph) -> None:
    overlapping = [key for key, c in write_counts(odd_graph).items() if c.max() > 1]

    assert overlapping == []


def test_tiles_cover_fresh_outputs(odd_graph: TaskGraph) -> None:
    uncovered = [
        (op_name, tensor, int((c == 0).sum()))
        for (op_name, tensor), c in write_counts(odd_graph).items()
        if is_fresh_output(odd_graph.graph, op_name, tensor) and c.min() == 0
    ]

    assert uncovered == []


def test_odd_widths_leave_remainder_tiles(odd_graph: TaskGraph) -> None:
    # Checks that the shapes above exercise the remainder path they are chosen for. With
    # one worker, each segment of a linear layer is one tile instead.
    widths: dict[str, list[int]] = {}
    for t in range(odd_graph.num_tasks):
        if odd_graph.op[t] >= 0 and odd_graph.graph.ops[odd_graph.op[t]].kind == "linear":
            c0, c1 = odd_graph.tile[t]
            widths.setdefault(odd_graph.graph.ops[odd_graph.op[t]].name, []).append(c1 - c0)

    if odd_graph.target.workers == 1:
        segments = {op.name: op.attrs["segments"] for op in odd_graph.graph.ops if op.kind == "linear"}
        assert all(sorted(w) == sorted(segments[name]) for name, w in widths.items())
    else:
        assert any(len(set(w)) > 1 for w in widths.values())


# --- events and assignment --------------------------------------------------------------


def test_one_wait_one_signal_per_task(odd_graph: TaskGraph) -> None:
    tg = odd_graph

    assert len(tg.wait) == tg.num_tasks
    assert len(tg.signal) == tg.num_tasks
    assert all(isinstance(e, int) and 0 <= e < tg.end for e in tg.wait)
    assert all(isinstance(e, int) and 0 < e <= tg.end for e in tg.signal)


def test_trigger_counts_match_signals(odd_graph: TaskGraph) -> None:
    tg = odd_graph
    signals = np.bincount(tg.signal, minlength=tg.num_events)

    assert tg.num_triggers[0] == 1  # BEGIN: the host
    assert list(signals[1:]) == tg.num_triggers[1:]


def test_consumers_contiguous(odd_graph: TaskGraph) -> None:
    tg = odd_graph
    broken = [
        e for e in range(tg.num_events)
        if [t for t in range(tg.num_tasks) if tg.wait[t] == e] != list(range(tg.first[e], tg.last[e]))
    ]

    assert broken == []


def test_triggers_precede_consumers(odd_graph: TaskGraph) -> None:
    tg = odd_graph
    late = [
        e for e in range(1, tg.end)
        if max(t for t in range(tg.num_tasks) if tg.signal[t] == e) >= tg.first[e]
    ]

    assert late == []


def test_worker_lists_follow_global_order(odd_graph: TaskGraph) -> None:
    tg = odd_graph
    for w in range(tg.target.workers):
        tasks = tg.worker_tasks(w)
        assert tasks == sorted(tasks)
    assert sorted(t for w in range(tg.target.workers) for t in tg.worker_tasks(w)) == list(range(tg.num_tasks))


def test_workers_run_to_end(odd_graph: TaskGraph) -> None:
    # Each worker runs its own list strictly in order, as the megakernel does. A task
    # starts once its event has received all its triggers.
    tg = odd_graph
    queues = [tg.worker_tasks(w) for w in range(tg.target.workers)]
    heads = [0] * len(queues)
    signaled = [0] * tg.num_events
    signaled[0] = tg.num_triggers[0]
    progress = True
    while progress:
        progress = False
        for w, queue in enumerate(queues):
            while heads[w] < len(queue) and signaled[tg.wait[queue[heads[w]]]] == tg.num_triggers[tg.wait[queue[heads[w]]]]:
                signaled[tg.signal[queue[heads[w]]]] += 1
                heads[w] += 1
                progress = True

    stuck = [(w, queue[heads[w]]) for w, queue in enumerate(queues) if heads[w] < len(queue)]
    assert stuck == []
    assert signaled[tg.end] == tg.num_triggers[tg.end]


def test_stats_present(odd_graph: TaskGraph) -> None:
    stats = odd_graph.stats
    for key in ("exact_edges", "reduced_edges", "fused_events", "merged_events", "relay_tasks", "coarsened_consumers",
                "events", "tasks", "critical_path_seconds", "event_critical_path_seconds", "worker_load_seconds"):
        assert key in stats, key


def test_stats_consistent(odd_graph: TaskGraph) -> None:
    tg, stats = odd_graph, odd_graph.stats

    assert stats["relay_tasks"] == sum(1 for o in tg.op if o < 0)
    assert stats["events"] == tg.num_events
    assert stats["tasks"] == tg.num_tasks
    assert stats["reduced_edges"] <= stats["exact_edges"]
    assert 0 <= stats["coarsened_consumers"] <= tg.num_tasks
    assert stats["event_critical_path_seconds"] >= stats["critical_path_seconds"]
    assert len(stats["worker_load_seconds"]) == tg.target.workers


# --- memory sharing and write-after-read ------------------------------------------------


def unimplied_war_edges(graph: OpGraph, target: Target, share_memory: bool) -> list[tuple[int, int]]:
    """Write-after-read edges that the other dependencies do not already imply."""
    placement = plan_memory(graph, share_memory)
    table = make_tasks(graph, placement, target)
    names = list(placement.buffers)
    written = {names.index(placement.home[n]) for op in graph.ops for n in op.outputs.values()}
    with_war = find_dependencies(table, written, True)
    without_war = find_dependencies(table, written, False)
    anc = ancestor_sets(without_war)
    return [(p, c) for c in range(len(table)) for p in with_war[c] - without_war[c] if not (anc[c] >> p) & 1]


@pytest.mark.parametrize("workers", WORKERS)
def test_war_only_with_shared_memory(workers: int, llama_dir: Path) -> None:
    target = cpu_target(workers)
    for cfg in (odd_config(), load_config(llama_dir)):
        graph = decoder_graph(cfg, 4, MAX_SEQ_LEN, target)
        assert unimplied_war_edges(graph, target, share_memory=False) == []
    if workers > 1:
        # One worker gets one tile per operator, which orders every reader before the next writer.
        assert unimplied_war_edges(graph, target, share_memory=True) != []


@pytest.mark.parametrize("workers", [7, 64])
def test_untracked_war_needs_sharing(workers: int, llama_dir: Path) -> None:
    cfg, target = load_config(llama_dir), cpu_target(workers)
    unshared = CompileOptions(share_memory=False, track_war=False)
    shared = CompileOptions(share_memory=True, track_war=False)

    compile_decoder(cfg, 4, target, unshared)  # verifies, raising on a hazard
    with pytest.raises(VerificationError, match="write-after-read"):
        compile_decoder(cfg, 4, target, shared)


def test_shared_memory_uses_fewer_buffers(llama_dir: Path) -> None:
    graph = decoder_graph(load_config(llama_dir), 4, MAX_SEQ_LEN)

    def activations(share: bool) -> int:
        return sum(1 for b in plan_memory(graph, share).buffers.values() if b.kind is TensorKind.ACTIVATION)

    assert activations(True) < activations(False)


# --- config only, file format, full-size compile ----------------------------------------


def test_compile_from_config_alone(qwen3_dir: Path, tmp_path: Path) -> None:
    shutil.copy(qwen3_dir / "config.json", tmp_path / "config.json")
    target = cpu_target(7)

    tg = compile_decoder(load_config(tmp_path), 1, target)

    assert list(tmp_path.glob("*.safetensors")) == []
    assert tg.num_tasks > 0
    # The weights name tensors of the real checkpoint, so it can be loaded later.
    names = set(Checkpoint(qwen3_dir).names())
    sources = {n for spec in tg.graph.tensors_of(TensorKind.WEIGHT) for n in spec.source.names}
    assert sources <= names
    assert names <= sources


def test_save_load_round_trip(qwen3_dir: Path, tmp_path: Path) -> None:
    tg = compile_decoder(load_config(qwen3_dir), 4, cpu_target(7))

    loaded = load_task_graph(tg.save(tmp_path))

    assert loaded.to_dict() == json.loads(json.dumps(tg.to_dict()))
    assert loaded.tile == tg.tile
    verify(loaded)


def test_loaded_graph_runs_same(qwen3_dir: Path, tmp_path: Path) -> None:
    tg = compile_decoder(load_config(qwen3_dir), 4, cpu_target(7))
    loaded = load_task_graph(tg.save(tmp_path))
    weights = load_weights(tg.graph, Checkpoint(qwen3_dir))
    inputs = {"tokens": torch.tensor([5, 6, 7, 8]), "positions": torch.tensor([0, 1, 2, -1])}

    original = ReferenceExecutor(tg, weights, seed=1).run(inputs)
    reloaded = ReferenceExecutor(loaded, weights, seed=1).run(inputs)

    assert original.keys() == reloaded.keys()
    for name in original:
        torch.testing.assert_close(reloaded[name], original[name], rtol=0, atol=0, equal_nan=False)


def test_qwen3_8b_preset_compiles() -> None:
    target = make_target("h100")
    cfg = get_preset("qwen3-8b")

    tg = compile_graph(decoder_graph(cfg, 1, 4096, target), target)

    # Per Qwen3 decode layer on a GPU with a 4096-slot cache: 2 norms, qkv, split attention
    # (q/k norm, rope, KV append and attention per cache chunk) and its combine, o_proj,
    # gate_up, silu_mul, down.
    layer_ops = sum(1 for op in tg.graph.ops if op.name.startswith("layers."))
    assert layer_ops == 9 * cfg.num_layers
    kinds = {op.kind for op in tg.graph.ops}
    assert {"split_attention", "attention_combine"} <= kinds
    assert not kinds & {"qk_norm", "rope", "attention", "fused_attention"}
    assert "verify" in tg.stats["compile_seconds"]


def test_decode_attention_splits_follow_the_target() -> None:
    from mpk.frontend.decoder import decode_attention_splits

    cfg = get_preset("qwen3-0.6b")  # 8 KV heads
    assert decode_attention_splits(cfg, 4096, make_target("h100")) == 8   # 4096 slots in chunks of 512
    assert decode_attention_splits(cfg, 40960, make_target("h100")) == 16  # one task per SM: 132 // 8
    assert decode_attention_splits(cfg, 512, make_target("h100")) == 1
    assert decode_attention_splits(cfg, 40960, make_target("cpu")) == 1

    target = make_target("h100")
    tg = compile_graph(decoder_graph(cfg, 1, 4096, target), target)  # verified on compile
    split_tasks = [t for t in range(tg.num_tasks) if tg.op[t] >= 0 and tg.graph.ops[tg.op[t]].kind == "split_attention"]
    assert len(split_tasks) == cfg.num_layers * 8 * 8


# --- a graph built by hand --------------------------------------------------------------

VOCAB, HIDDEN, INTER, TOKENS, EPS = 40, 24, 20, 3, 1e-6


def hand_graph() -> OpGraph:
    b = GraphBuilder("hand-built", TOKENS)
    tokens = b.input("tokens", (TOKENS,), "int64")
    x = b.embedding(tokens, b.weight("embed", (VOCAB, HIDDEN)))
    normed = b.rmsnorm(x, b.weight("norm", (HIDDEN,)), EPS, name="norm")
    gate_up = b.linear(normed, b.weight("gate_up", (2 * INTER, HIDDEN)), name="gate_up", segments=[INTER, INTER])
    act = b.silu_mul(gate_up, name="act")
    # In place, like a decoder's residual stream: the embedding output is read by the norm, then overwritten.
    hidden = b.linear(act, b.weight("down", (HIDDEN, INTER)), name="down", residual=x, out=x)
    logits = b.mark_output(b.linear(hidden, b.weight("head", (VOCAB, HIDDEN)), name="head"))
    b.mark_output(b.argmax(logits, chunk=16))
    return b.build()


def hand_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(VOCAB, HIDDEN, generator=g),
        "norm": 1 + 0.2 * torch.randn(HIDDEN, generator=g),
        "gate_up": torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5,
        "down": torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5,
        "head": torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5,
    }


def hand_torch(w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    x = w["embed"][ids].double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w["norm"].double()
    gate_up = normed @ w["gate_up"].double().T
    act = F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]
    hidden = x + act @ w["down"].double().T
    return hidden @ w["head"].double().T


@pytest.mark.parametrize("workers", [1, 3, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_hand_built_graph_matches_torch(workers: int, seed: int) -> None:
    weights = hand_weights(seed)
    ids = torch.tensor([3, 39, 17])
    expected = hand_torch(weights, ids)
    tg = compile_graph(hand_graph(), cpu_target(workers))

    out = ReferenceExecutor(tg, weights, seed=seed).run({"tokens": ids})

    torch.testing.assert_close(out["head.out"].double(), expected, rtol=1e-5, atol=1e-5)
    assert out["argmax.reduce.out"].tolist() == expected.argmax(dim=1).tolist()
