"""The verifier rejects task graphs that race or can deadlock.

Mutation tests take real compiled graphs, remove one event edge at a time and check the
verifier's result against an independent oracle. The oracle requires every two tasks of
different operators that touch overlapping boxes of one buffer, one of them writing, to
be ordered by a chain of events. It is needed because event coarsening can make an edge
redundant: removing it leaves every hazard ordered, and the verifier must then accept
the graph.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import pytest

from mpk.compiler.pipeline import CompileOptions, compile_graph
from mpk.compiler.taskgraph import TaskGraph
from mpk.compiler.verify import verify
from mpk.errors import VerificationError
from mpk.frontend.config import load_config
from mpk.frontend.decoder import decoder_graph
from mpk.frontend.presets import get_preset
from mpk.ir.region import Box
from mpk.ops import spec_of
from mpk.ops.base import role_tensor
from mpk.target import cpu_target, make_target

BEGIN = 0
EDGES_PER_GRAPH = 150
MAX_SEQ_LEN = 64

HAZARD = re.compile(
    r"unordered (?P<kind>[a-z-]+) hazard on buffer '(?P<buffer>[^']+)' region \[(?P<region>[^\]]*)\] "
    r"between (?P<first>task (?P<first_id>\d+) \([^)]*\)) and (?P<second>task (?P<second_id>\d+) \([^)]*\))"
)


# --- copies and mutations ---------------------------------------------------------------


def clone(tg: TaskGraph) -> TaskGraph:
    """Copy the per-task and per-event columns. The operator graph is shared and never mutated."""
    return dataclasses.replace(
        tg, op=list(tg.op), tile=list(tg.tile), wait=list(tg.wait), signal=list(tg.signal),
        worker=list(tg.worker), seconds=list(tg.seconds), num_triggers=list(tg.num_triggers),
        first=list(tg.first), last=list(tg.last), stats=dict(tg.stats),
    )


def reorder(tg: TaskGraph, order: list[int]) -> TaskGraph:
    """Put the tasks in a new global order (``order`` lists old ids) and recompute each
    event's consumer range from the waits. An event without consumers gets the empty
    range at the end, as the compiler writes END's.
    """
    out = clone(tg)
    for column in ("op", "tile", "wait", "signal", "worker", "seconds"):
        values = getattr(tg, column)
        setattr(out, column, [values[t] for t in order])
    n = len(order)
    positions: dict[int, list[int]] = {}
    for position, event in enumerate(out.wait):
        positions.setdefault(event, []).append(position)
    for e in range(out.num_events):
        members = positions.get(e)
        out.first[e], out.last[e] = (min(members), max(members) + 1) if members else (n, n)
    return out


def drop_trigger(tg: TaskGraph, task: int, *, fix_counts: bool) -> TaskGraph:
    """Make ``task`` signal END in place of its event, and with ``fix_counts`` fix both trigger counts."""
    out = clone(tg)
    event = out.signal[task]
    out.signal[task] = out.end
    if fix_counts:
        out.num_triggers[event] -= 1
        out.num_triggers[out.end] += 1
    return out


def drop_wait_in_place(tg: TaskGraph, task: int) -> TaskGraph:
    """Make ``task`` wait on BEGIN at its position, leaving the consumer ranges as they were."""
    out = clone(tg)
    out.wait[task] = BEGIN
    return out


def move_to_begin(tg: TaskGraph, task: int) -> tuple[TaskGraph, list[int]]:
    """Make ``task`` a consumer of BEGIN by moving it to the end of BEGIN's block, which
    keeps every consumer range contiguous and every trigger before its consumers.
    """
    insert_at = tg.last[BEGIN]
    order = [t for t in range(tg.num_tasks) if t != task]
    order.insert(insert_at, task)
    out = clone(tg)
    out.wait[task] = BEGIN
    return reorder(out, order), order


# --- the oracle -------------------------------------------------------------------------


def task_accesses(tg: TaskGraph) -> list[list[tuple[str, Box, bool]]]:
    """Per task: (physical buffer, box, write) from the operator specs."""
    found = []
    for t in range(tg.num_tasks):
        if tg.op[t] < 0:
            found.append([])
            continue
        op = tg.graph.ops[tg.op[t]]
        found.append([
            (tg.placement.home[role_tensor(op, a.role)], a.box, a.write)
            for a in spec_of(op.kind).accesses(op, tg.graph.tensors, tg.tile[t])
        ])
    return found


def required_pairs(tg: TaskGraph) -> set[tuple[int, int]]:
    """Pairs (a, b) of tasks that must be ordered a before b: different operators, a's
    operator first, overlapping boxes of one buffer, at least one of the two writing.
    """
    per_buffer: dict[str, list[tuple[int, int, Box, bool]]] = {}
    for t, accesses in enumerate(task_accesses(tg)):
        for buffer, box, write in accesses:
            per_buffer.setdefault(buffer, []).append((t, tg.op[t], box, write))
    pairs: set[tuple[int, int]] = set()
    for items in per_buffer.values():
        writes = np.array([w for *_, w in items])
        if not writes.any():
            continue
        tasks = np.array([t for t, *_ in items])
        ops = np.array([o for _, o, *_ in items])
        boxes = np.array([box for *_, box, _ in items])
        lo, hi = boxes[:, :, 0], boxes[:, :, 1]
        overlap = np.all(np.maximum(lo[:, None], lo[None]) < np.minimum(hi[:, None], hi[None]), axis=2)
        conflict = overlap & (writes[:, None] | writes[None]) & (ops[:, None] < ops[None])
        for i, j in zip(*np.nonzero(conflict)):
            pairs.add((int(tasks[i]), int(tasks[j])))
    return pairs


def ancestors(tg: TaskGraph) -> list[int] | None:
    """Per task, the bitset of tasks that finish before it starts, found by running the
    event counters: an event fires once its triggers have signaled it, and an event with
    no triggers counts as fired from the start. Returns None if some task never runs.
    """
    consumers = {e: range(tg.first[e], tg.last[e]) for e in range(tg.num_events)}
    pending = list(tg.num_triggers)
    fired_after = [0] * tg.num_events
    result: list[int | None] = [None] * tg.num_tasks
    ready = [t for e in range(tg.num_events - 1) if e == BEGIN or pending[e] == 0 for t in consumers[e]]
    while ready:
        task = ready.pop()
        result[task] = fired_after[tg.wait[task]]
        event = tg.signal[task]
        fired_after[event] |= result[task] | (1 << task)
        pending[event] -= 1
        if pending[event] == 0 and event != tg.end:
            ready.extend(consumers[event])
    if any(bits is None for bits in result):
        return None
    return result


def unordered_pairs(tg: TaskGraph, pairs: set[tuple[int, int]], new_id: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """Return the required pairs (in the ids of ``pairs``) that ``tg`` leaves unordered."""
    before = ancestors(tg)
    if before is None:
        return sorted(pairs)
    new_id = new_id or {}
    return [(a, b) for a, b in sorted(pairs) if not (before[new_id.get(b, b)] >> new_id.get(a, a)) & 1]


def verification_error(tg: TaskGraph) -> str | None:
    try:
        verify(tg)
    except VerificationError as exc:
        return str(exc)
    return None


def tasks_of(tg: TaskGraph, op_name: str) -> list[int]:
    return [t for t in range(tg.num_tasks) if tg.op[t] >= 0 and tg.graph.ops[tg.op[t]].name == op_name]


def parse_region(text: str) -> Box:
    return tuple(tuple(int(v) for v in part.split(":")) for part in text.split(", "))


def contains(outer: Box, inner: Box) -> bool:
    return all(olo <= ilo and ihi <= ohi for (olo, ohi), (ilo, ihi) in zip(outer, inner))


def message_problems(tg: TaskGraph, message: str, kind: str | None = None) -> list[str]:
    """Check that a hazard message names two real tasks, a real buffer and a region that
    both tasks touch, each reading or writing it as the hazard kind requires. Returns the
    problems found, empty when there are none.
    """
    match = HAZARD.search(message)
    if match is None:
        return [f"not a hazard message: {message}"]
    problems = []
    if kind is not None and match["kind"] != kind:
        problems.append(f"kind {match['kind']!r}, expected {kind!r}")
    first, second = int(match["first_id"]), int(match["second_id"])
    for label, task in ((match["first"], first), (match["second"], second)):
        if task >= tg.num_tasks or label != tg.task_label(task):
            problems.append(f"{label!r} is not the label of task {task}")
    if problems:
        return problems
    buffer = match["buffer"]
    if buffer not in tg.placement.buffers:
        return [f"buffer {buffer!r} does not exist"]
    region = parse_region(match["region"])
    accesses = task_accesses(tg)

    def touches(task: int, write: bool | None) -> bool:
        return any(b == buffer and contains(box, region) and write in (None, w) for b, box, w in accesses[task])

    # read-after-write names the writer first, write-after-read the reader first.
    expected = {
        "read-after-write": (True, False),
        "write-after-read": (False, True),
        "write-after-write": (True, True),
    }.get(match["kind"], (None, None))
    for label, task, write in ((match["first"], first, expected[0]), (match["second"], second, expected[1])):
        if not touches(task, write):
            action = {None: "touch", True: "write", False: "read"}[write]
            problems.append(f"{label} does not {action} {buffer} region [{match['region']}]")
    return problems


# --- graphs -----------------------------------------------------------------------------


GRAPHS = [
    ("qwen3", 1, 1), ("qwen3", 7, 4), ("qwen3", 64, 1),
    ("llama", 2, 4), ("llama", 7, 1), ("llama", 64, 4),
]


@dataclasses.dataclass
class Compiled:
    tg: TaskGraph
    pairs: set[tuple[int, int]]
    trigger_edges: list[int]              # tasks whose signal is not END
    consumer_edges: list[tuple[int, int]]  # (event, task) with event not BEGIN


@pytest.fixture(scope="module", params=GRAPHS, ids=lambda p: f"{p[0]}-w{p[1]}-t{p[2]}")
def compiled(request: pytest.FixtureRequest) -> Compiled:
    arch, workers, tokens = request.param
    cfg = load_config(request.getfixturevalue(f"{arch}_dir"))
    tg = compile_graph(decoder_graph(cfg, tokens, MAX_SEQ_LEN), cpu_target(workers))
    triggers = [t for t in range(tg.num_tasks) if tg.signal[t] != tg.end]
    consumers = [(e, t) for e in range(1, tg.num_events) for t in range(tg.first[e], tg.last[e])]
    return Compiled(tg, required_pairs(tg), triggers, consumers)


def sample(edges: list, seed: int) -> list:
    rng = random.Random(seed)
    return rng.sample(edges, min(EDGES_PER_GRAPH, len(edges)))


# --- mutation tests ---------------------------------------------------------------------


def test_compiled_graph_passes_oracle(compiled: Compiled) -> None:
    assert compiled.pairs, "the oracle found no hazards to order"
    assert unordered_pairs(compiled.tg, compiled.pairs) == []
    assert verification_error(compiled.tg) is None


def test_plain_trigger_removal_rejected(compiled: Compiled) -> None:
    # The event still expects the removed trigger, so it would never fire.
    missed = []
    for task in sample(compiled.trigger_edges, seed=1):
        error = verification_error(drop_trigger(compiled.tg, task, fix_counts=False))
        if error is None or "triggers but" not in error:
            missed.append((task, error))
    assert missed == []


def test_weakened_trigger_matches_oracle(compiled: Compiled) -> None:
    tg = compiled.tg
    wrong, bad_messages, harmful = [], [], 0
    for task in sample(compiled.trigger_edges, seed=2):
        mutated = drop_trigger(tg, task, fix_counts=True)
        unordered = unordered_pairs(mutated, compiled.pairs)
        error = verification_error(mutated)
        harmful += bool(unordered)
        if bool(unordered) != (error is not None):
            wrong.append((tg.task_label(task), unordered[:2], error))
        elif error is not None:
            bad_messages += [(task, p) for p in message_problems(mutated, error)]
    assert wrong == []
    assert bad_messages == []
    # Most edges must carry a hazard, or this test would check nothing.
    assert harmful >= 0.8 * min(EDGES_PER_GRAPH, len(compiled.trigger_edges))


def test_plain_wait_removal_rejected(compiled: Compiled) -> None:
    # The task no longer waits on the event whose consumer range still contains it.
    missed = []
    for event, task in sample(compiled.consumer_edges, seed=3):
        error = verification_error(drop_wait_in_place(compiled.tg, task))
        if error is None or "are not exactly tasks" not in error:
            missed.append((event, task, error))
    assert missed == []


def test_weakened_wait_matches_oracle(compiled: Compiled) -> None:
    tg = compiled.tg
    wrong, bad_messages, harmful, checked = [], [], 0, 0
    for event, task in sample(compiled.consumer_edges, seed=4):
        mutated, order = move_to_begin(tg, task)
        error = verification_error(mutated)
        if tg.last[event] - tg.first[event] == 1:
            # Its only consumer gone, the event can no longer reach END.
            if error is None or "has no consumers" not in error:
                wrong.append((event, tg.task_label(task), "expected a no-consumers error", error))
            continue
        checked += 1
        unordered = unordered_pairs(mutated, compiled.pairs, {old: new for new, old in enumerate(order)})
        harmful += bool(unordered)
        if bool(unordered) != (error is not None):
            wrong.append((event, tg.task_label(task), unordered[:2], error))
        elif error is not None:
            bad_messages += [(task, p) for p in message_problems(mutated, error)]
    assert wrong == []
    assert bad_messages == []
    assert harmful >= 0.8 * checked


# --- write-after-read without WAR tracking ----------------------------------------------


@pytest.fixture(scope="module")
def qwen3_8b_short():
    """Qwen3-8B's shapes with two layers, enough to show the hazards of every layer."""
    return dataclasses.replace(get_preset("qwen3-8b"), num_layers=2)


@pytest.mark.parametrize("model", ["llama", "qwen3-8b"])
def test_untracked_war_rejected(model: str, request: pytest.FixtureRequest, qwen3_8b_short) -> None:
    if model == "llama":
        cfg, target = load_config(request.getfixturevalue("llama_dir")), cpu_target(7)
    else:
        cfg, target = qwen3_8b_short, make_target("h100")
    graph = decoder_graph(cfg, 1, MAX_SEQ_LEN)
    tracked = compile_graph(graph, target, CompileOptions(verify=False))
    untracked = compile_graph(graph, target, CompileOptions(track_war=False, verify=False))

    assert verification_error(tracked) is None
    error = verification_error(untracked)
    assert error is not None
    assert "write-after-read" in error
    assert message_problems(untracked, error, kind="write-after-read") == []


def test_untracked_war_is_real_race(llama_dir: Path) -> None:
    # The verifier's complaint must match a pair the oracle also finds unordered.
    tg = compile_graph(decoder_graph(load_config(llama_dir), 1, MAX_SEQ_LEN), cpu_target(7), CompileOptions(track_war=False, verify=False))
    match = HAZARD.search(verification_error(tg) or "")
    assert match is not None
    pair = (int(match["first_id"]), int(match["second_id"]))

    assert pair in unordered_pairs(tg, required_pairs(tg))


# --- messages ---------------------------------------------------------------------------


def test_hazard_message_names_tasks_buffer_region(qwen3_dir: Path) -> None:
    tg = compile_graph(decoder_graph(load_config(qwen3_dir), 4, MAX_SEQ_LEN), cpu_target(7))
    # The first task of the first layer's qkv projection feeds the qk_norm of group 0.
    task = tasks_of(tg, "layers.0.qkv_proj")[0]
    mutated = drop_trigger(tg, task, fix_counts=True)

    error = verification_error(mutated)

    assert error is not None
    match = HAZARD.search(error)
    assert match is not None, error
    assert match["first"] == tg.task_label(task)
    assert match["buffer"] in tg.placement.buffers
    assert message_problems(mutated, error) == []


# --- structure errors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_graph(llama_dir: Path) -> TaskGraph:
    return compile_graph(decoder_graph(load_config(llama_dir), 4, MAX_SEQ_LEN), cpu_target(7))


@pytest.mark.parametrize("delta", [1, -1])
def test_trigger_count_off_by_one(llama_graph: TaskGraph, delta: int) -> None:
    for event in (1, llama_graph.num_events // 2, llama_graph.end):
        mutated = clone(llama_graph)
        mutated.num_triggers[event] += delta

        error = verification_error(mutated)

        assert error is not None
        assert f"event {event} expects {llama_graph.num_triggers[event] + delta} triggers" in error


def test_wait_on_later_signal_deadlock(llama_graph: TaskGraph) -> None:
    tg = llama_graph
    # Move the consumers of a mid-graph event in front of the block that holds its last trigger.
    event = next(e for e in range(tg.num_events // 2, tg.end) if tg.last[e] > tg.first[e])
    last_trigger = max(t for t in range(tg.num_tasks) if tg.signal[t] == event)
    block_start = tg.first[tg.wait[last_trigger]]
    block = list(range(tg.first[event], tg.last[event]))
    rest = [t for t in range(tg.num_tasks) if t not in block]
    order = rest[:block_start] + block + rest[block_start:]

    error = verification_error(reorder(tg, order))

    assert error is not None
    assert "deadlock" in error
    assert f"event {event} " in error


def test_wait_on_end_rejected(llama_graph: TaskGraph) -> None:
    mutated = clone(llama_graph)
    task = mutated.num_tasks - 1
    mutated.wait[task] = mutated.end

    error = verification_error(mutated)

    assert error is not None
    assert "END cannot be waited on" in error


def test_signal_begin_rejected(llama_graph: TaskGraph) -> None:
    mutated = clone(llama_graph)
    mutated.signal[0] = BEGIN

    error = verification_error(mutated)

    assert error is not None
    assert "BEGIN is signaled by the host" in error


def test_worker_out_of_range_rejected(llama_graph: TaskGraph) -> None:
    mutated = clone(llama_graph)
    mutated.worker[3] = mutated.target.workers

    error = verification_error(mutated)

    assert error is not None
    assert f"worker {mutated.target.workers}" in error


def test_missing_tile_rejected(llama_graph: TaskGraph) -> None:
    # Turning one tile of a projection into a relay leaves its columns unwritten.
    tg = llama_graph
    task = tasks_of(tg, "layers.1.gate_up_proj")[0]
    mutated = clone(tg)
    mutated.op[task], mutated.tile[task] = -1, ()

    error = verification_error(mutated)

    assert error is not None
    assert "missing tiles" in error


def test_short_event_column_rejected(llama_graph: TaskGraph) -> None:
    # The verifier trusts nothing the compiler derived, the column lengths included.
    mutated = clone(llama_graph)
    mutated.first.pop()

    error = verification_error(mutated)

    assert error is not None
    assert "first" in error


def test_operator_index_out_of_range_rejected(llama_graph: TaskGraph) -> None:
    mutated = clone(llama_graph)
    mutated.op[0] = len(mutated.graph.ops)

    error = verification_error(mutated)

    assert error is not None
    assert "task 0" in error


def test_tile_past_end_rejected(llama_graph: TaskGraph) -> None:
    # Shifted 8 columns right, the last gate_up tile leaves 8 columns unwritten and writes 8
    # past the end, so the tile volumes still add up to the full width.
    tg = llama_graph
    task = tasks_of(tg, "layers.0.gate_up_proj")[-1]
    mutated = clone(tg)
    c0, c1 = mutated.tile[task]
    mutated.tile[task] = (c0 + 8, c1 + 8)

    error = verification_error(mutated)

    assert error is not None
    assert "layers.0.gate_up_proj" in error


@pytest.mark.parametrize("op_name", ["layers.0.o_proj", "layers.0.rope"])
def test_missing_in_place_tile_rejected(llama_graph: TaskGraph, op_name: str) -> None:
    # Without its last o_proj tile the residual stream misses the attention output in those
    # columns, and without its last rope tile a KV group's cache is never written.
    tg = llama_graph
    task = tasks_of(tg, op_name)[-1]
    mutated = clone(tg)
    mutated.op[task], mutated.tile[task] = -1, ()

    error = verification_error(mutated)

    assert error is not None
    assert op_name in error
