"""The verifier: a static proof that a task graph has no race and cannot deadlock.

It trusts nothing the compiler derived. Accesses are recomputed from the operator specs,
and happens-before is rebuilt from the events alone:

* structure: every task waits on one event and signals one; the consumers of an event
  are contiguous; every event's triggers come before its consumers in the global order;
  every event but END has consumers. With workers taking their tasks in global order,
  this rules out deadlock and makes every task run after BEGIN and before END.
* coverage: the tiles of an operator write disjoint boxes, and cover its fresh outputs.
* hazards: every buffer is cut into cells along all access boundaries; in each cell,
  each read must follow the last write, and each write must follow the last write and
  every read since, through a chain of events.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import VerificationError
from mpk.ir.region import Box, box_intersection, box_volume, boxes_to_arrays, format_box, overlap_matrix
from mpk.ir.tensor import TensorKind
from mpk.ops import spec_of
from mpk.ops.base import role_tensor

BEGIN_EVENT = 0  # signaled by the host, so it has no trigger tasks


def verify(tg: TaskGraph) -> None:
    check_structure(tg)
    accesses = _task_accesses(tg)
    check_coverage(tg, accesses)
    check_hazards(tg, accesses, _happens_before(tg))


def check_structure(tg: TaskGraph) -> None:
    """Columns fit together, every task waits and signals legally, and events fire in order."""
    _check_columns(tg)
    _check_tasks(tg)
    _check_events(tg)


def _check_columns(tg: TaskGraph) -> None:
    n, events = tg.num_tasks, tg.num_events
    if events < 2:
        raise VerificationError(f"the task graph has {events} events; it needs at least BEGIN and END")
    for name, column in (("wait", tg.wait), ("signal", tg.signal), ("worker", tg.worker), ("tile", tg.tile)):
        if len(column) != n:
            raise VerificationError(f"the {name} column has {len(column)} entries for {n} tasks")
    for name, column in (("num_triggers", tg.num_triggers), ("first", tg.first), ("last", tg.last)):
        if len(column) != events:
            raise VerificationError(f"the event column {name!r} has {len(column)} entries for {events} events")

    for e in range(events):
        if not 0 <= tg.first[e] <= tg.last[e] <= n:
            raise VerificationError(f"event {e} has consumer range {tg.first[e]}..{tg.last[e]}, outside the {n} tasks")
    for name in tg.graph.tensors:
        if tg.placement.home.get(name) not in tg.placement.buffers:
            raise VerificationError(f"tensor {name!r} has no buffer in the placement")


def _check_tasks(tg: TaskGraph) -> None:
    end = tg.end
    arity: dict[str, int] = {}
    for t in range(tg.num_tasks):
        if not -1 <= tg.op[t] < len(tg.graph.ops):
            raise VerificationError(f"task {t} names operator {tg.op[t]}, but the graph has {len(tg.graph.ops)}")
        if tg.op[t] >= 0:
            op = tg.graph.ops[tg.op[t]]
            expected = arity.setdefault(op.kind, len(spec_of(op.kind).tiles(op, tg.graph.tensors, tg.target.tiling)[0]))
            if len(tg.tile[t]) != expected:
                raise VerificationError(f"task {t} ({op.name}) has tile {list(tg.tile[t])}, but {op.kind} tiles have {expected} values")

        if not 0 <= tg.wait[t] < end:
            raise VerificationError(f"{tg.task_label(t)} waits on event {tg.wait[t]}, outside 0..{end - 1} (END cannot be waited on by a task)")
        if not 0 < tg.signal[t] <= end:
            raise VerificationError(f"{tg.task_label(t)} signals event {tg.signal[t]}, outside 1..{end} (BEGIN is signaled by the host)")
        if not 0 <= tg.worker[t] < tg.target.workers:
            raise VerificationError(f"{tg.task_label(t)} is assigned to worker {tg.worker[t]}, but the target has {tg.target.workers}")


def _check_events(tg: TaskGraph) -> None:
    end = tg.end
    counts = [0] * tg.num_events
    last_trigger = [-1] * tg.num_events
    for t in range(tg.num_tasks):
        counts[tg.signal[t]] += 1
        last_trigger[tg.signal[t]] = t

    for e in range(tg.num_events):
        first, last = tg.first[e], tg.last[e]
        if e != BEGIN_EVENT and counts[e] != tg.num_triggers[e]:
            raise VerificationError(f"event {e} expects {tg.num_triggers[e]} triggers but {counts[e]} tasks signal it, so it would never fire or fire early")
        if e != end and first >= last:
            raise VerificationError(f"event {e} has no consumers, so the tasks that signal it never reach END")
        if any(tg.wait[t] != e for t in range(first, last)):
            raise VerificationError(f"the consumers of event {e} are not exactly tasks {first}..{last - 1}")
        if e != BEGIN_EVENT and e != end and last_trigger[e] >= first:
            raise VerificationError(
                f"event {e} is signaled by {tg.task_label(last_trigger[e])}, which is not before its first consumer "
                f"{tg.task_label(first)} in the global order: a worker could wait on it forever (deadlock)"
            )

    waiting = sum(tg.last[e] - tg.first[e] for e in range(tg.num_events))
    if waiting != tg.num_tasks:
        raise VerificationError(f"event consumer ranges cover {waiting} tasks, but there are {tg.num_tasks}")


def _task_accesses(tg: TaskGraph) -> list[list[tuple[str, Box, bool, bool]]]:
    """Return, per task: (buffer, box, is_write, is_in_place_update) from the specs."""
    out: list[list[tuple[str, Box, bool, bool]]] = []
    for t in range(tg.num_tasks):
        if tg.op[t] < 0:
            out.append([])
            continue
        op = tg.graph.ops[tg.op[t]]
        spec = spec_of(op.kind)
        found = []
        for access in spec.accesses(op, tg.graph.tensors, tg.tile[t]):
            tensor = role_tensor(op, access.role)
            in_place = access.role in spec.inplace and op.inputs.get(spec.inplace[access.role]) == tensor
            in_place = in_place or tg.graph.tensors[tensor].kind is TensorKind.STATE
            found.append((tg.placement.home[tensor], access.box, access.write, in_place))
        out.append(found)
    return out


def check_coverage(tg: TaskGraph, accesses: list) -> None:
    """Check that every access stays inside its buffer, every operator has exactly the tiles its spec
    cuts for the target, and the tiles write disjoint boxes that cover fresh outputs.
    """
    by_op: dict[int, dict[str, list[tuple[int, Box, bool]]]] = {}
    tiles: dict[int, list[tuple[int, ...]]] = {}
    for t in range(tg.num_tasks):
        tiles.setdefault(tg.op[t], []).append(tuple(tg.tile[t]))
        for buffer, box, write, in_place in accesses[t]:
            _check_bounds(tg, t, buffer, box)
            if write:
                by_op.setdefault(tg.op[t], {}).setdefault(buffer, []).append((t, box, in_place))
    for index, op in enumerate(tg.graph.ops):
        if index not in by_op:
            raise VerificationError(f"operator {op.name!r} has no tasks")
        expected = sorted(tuple(tile) for tile in spec_of(op.kind).tiles(op, tg.graph.tensors, tg.target.tiling))
        found = sorted(tiles[index])
        if found != expected:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            raise VerificationError(
                f"operator {op.name!r} has {len(found)} tiles where its spec cuts {len(expected)} for {tg.target.name}"
                f"{f'; missing tiles {missing[:4]}' if missing else ''}{f'; unexpected tiles {extra[:4]}' if extra else ''}"
            )
        for buffer, writes in by_op[index].items():
            _check_disjoint(tg, buffer, writes)
            if all(in_place for _, _, in_place in writes):
                continue
            shape = tg.placement.buffers[buffer].shape
            written = sum(box_volume(box) for _, box, _ in writes)
            if written != box_volume(tuple((0, s) for s in shape)):
                raise VerificationError(f"the tiles of operator {op.name!r} write {written} of the {box_volume(tuple((0, s) for s in shape))} elements of buffer {buffer!r}: a tile is missing")


def _check_bounds(tg: TaskGraph, task: int, buffer: str, box: Box) -> None:
    shape = tg.placement.buffers[buffer].shape
    if len(box) != len(shape) or any(not 0 <= lo < hi <= n for (lo, hi), n in zip(box, shape)):
        raise VerificationError(f"{tg.task_label(task)} accesses buffer {buffer!r} at {format_box(box)}, outside its shape {list(shape)}")


def _check_disjoint(tg: TaskGraph, buffer: str, writes: list[tuple[int, Box, bool]]) -> None:
    lo, hi = boxes_to_arrays([box for _, box, _ in writes])
    overlaps = np.triu(overlap_matrix(lo, hi, lo, hi), k=1)
    tasks = np.array([t for t, _, _ in writes])
    overlaps &= tasks[:, None] != tasks[None, :]  # one task may write two boxes that touch
    if overlaps.any():
        i, j = (int(v[0]) for v in np.nonzero(overlaps))
        region = box_intersection(writes[i][1], writes[j][1])
        raise VerificationError(f"{tg.task_label(writes[i][0])} and {tg.task_label(writes[j][0])} both write buffer {buffer!r} region {format_box(region)}")


def _happens_before(tg: TaskGraph) -> list[int]:
    """Per task, the bitset of tasks that finish before it starts, through events alone."""
    fired = [0] * tg.num_events
    before: list[int] = []
    for t in range(tg.num_tasks):
        bits = fired[tg.wait[t]]
        before.append(bits)
        fired[tg.signal[t]] |= bits | (1 << t)
    return before


def check_hazards(tg: TaskGraph, accesses: list, before: list[int]) -> None:
    per_buffer: dict[str, list[tuple[int, int, Box, bool]]] = {}
    for t in range(tg.num_tasks):
        for buffer, box, write, _ in accesses[t]:
            per_buffer.setdefault(buffer, []).append((tg.op[t], t, box, write))
    for buffer, items in per_buffer.items():
        if any(write for *_, write in items):
            _check_buffer(tg, buffer, sorted(items, key=lambda x: (x[0], x[1])), before)


def _check_buffer(tg: TaskGraph, buffer: str, items: list[tuple[int, int, Box, bool]], before: list[int]) -> None:
    ndim = len(items[0][2])
    cuts = [np.unique([v for *_, box, _ in items for v in box[d]]) for d in range(ndim)]
    last_write: dict[tuple, tuple[int, Box]] = {}
    reads_since: dict[tuple, list[tuple[int, Box]]] = {}
    i = 0
    while i < len(items):
        op = items[i][0]
        j = i
        while j < len(items) and items[j][0] == op:
            j += 1
        touched: dict[tuple, list[tuple[int, Box, bool]]] = {}
        for _, t, box, write in items[i:j]:
            for cell in _cells(box, cuts):
                touched.setdefault(cell, []).append((t, box, write))
        for cell, users in touched.items():
            _check_cell(tg, buffer, cell, users, last_write.get(cell), reads_since.get(cell, []), before)
            writers = [(t, box) for t, box, write in users if write]
            if writers:
                last_write[cell] = writers[0]
                reads_since[cell] = []
            reads_since.setdefault(cell, []).extend((t, box) for t, box, write in users if not write)
        i = j


def _cells(box: Box, cuts: list[np.ndarray]):
    ranges = [range(int(np.searchsorted(c, lo)), int(np.searchsorted(c, hi))) for (lo, hi), c in zip(box, cuts)]
    return product(*ranges)


def _check_cell(tg: TaskGraph, buffer: str, cell: tuple, users: list, last_write, reads: list, before: list[int]) -> None:
    writers = [(t, box) for t, box, write in users if write]
    if writers:
        other = next(((t, box) for t, box, _ in users if t != writers[0][0]), None)
        if other is not None:
            _fail(tg, "conflicting", buffer, writers[0], other, "two tasks of one operator touch it and one writes it")
    for t, box, write in users:
        if last_write is not None and last_write[0] != t and not (before[t] >> last_write[0]) & 1:
            _fail(tg, "write-after-write" if write else "read-after-write", buffer, last_write, (t, box))
        if write:
            for reader in reads:
                if reader[0] != t and not (before[t] >> reader[0]) & 1:
                    _fail(tg, "write-after-read", buffer, reader, (t, box))


def _fail(tg: TaskGraph, kind: str, buffer: str, first: tuple[int, Box], second: tuple[int, Box], why: str = "") -> None:
    region = box_intersection(first[1], second[1])
    region_text = format_box(region) if region is not None else format_box(second[1])
    reason = why or f"but no chain of events orders {tg.task_label(first[0])} before {tg.task_label(second[0])}"
    raise VerificationError(
        f"unordered {kind} hazard on buffer {buffer!r} region {region_text} between "
        f"{tg.task_label(first[0])} and {tg.task_label(second[0])}: {reason}"
    )
