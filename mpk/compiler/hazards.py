"""Dependency analysis: which earlier tasks each task must wait for.

Operators are visited in program order. For every buffer the pass keeps the live
writes (not yet entirely overwritten) and the reads since; a new read depends on the
live writes it overlaps (read after write), a new write on the live writes and reads it
overlaps (write after write, write after read). The tasks of one operator touch
disjoint output tiles, so all of them are tested against the state at once with numpy.
"""

from __future__ import annotations

import numpy as np

from mpk.compiler.tasks import TaskTable
from mpk.ir.region import boxes_to_arrays, covered_mask, overlap_matrix


class _Accesses:
    """A growing set of boxes of one buffer, each tagged with the task that touched it."""

    def __init__(self, ndim: int) -> None:
        self.lo = np.zeros((0, ndim), dtype=np.int64)
        self.hi = np.zeros((0, ndim), dtype=np.int64)
        self.task = np.zeros(0, dtype=np.int64)

    def add(self, lo: np.ndarray, hi: np.ndarray, task: np.ndarray) -> None:
        self.lo = np.concatenate([self.lo, lo])
        self.hi = np.concatenate([self.hi, hi])
        self.task = np.concatenate([self.task, task])

    def drop_covered(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if len(self.task) == 0:
            return
        keep = ~covered_mask(self.lo, self.hi, lo, hi)
        self.lo, self.hi, self.task = self.lo[keep], self.hi[keep], self.task[keep]


def find_dependencies(table: TaskTable, written: set[int], track_war: bool = True) -> list[set[int]]:
    """Return, for each task, the earlier tasks it conflicts with on some buffer.

    ``written`` lists the buffers any task writes; accesses to other buffers (weights,
    inputs the host fills before the iteration) cannot conflict and are skipped.
    """
    deps: list[set[int]] = [set() for _ in range(len(table))]
    live_writes: dict[int, _Accesses] = {}
    live_reads: dict[int, _Accesses] = {}

    for tasks in table.op_tasks:
        touched = _group_by_buffer(table, tasks, written)
        for buffer, (reads, writes) in touched.items():
            ndim = len((reads or writes)[0][1])
            w = live_writes.setdefault(buffer, _Accesses(ndim))
            r = live_reads.setdefault(buffer, _Accesses(ndim))
            if reads:
                _link(deps, reads, w)
            if writes:
                _link(deps, writes, w)
                if track_war:
                    _link(deps, writes, r)
        for buffer, (reads, writes) in touched.items():
            w, r = live_writes[buffer], live_reads[buffer]
            if writes:
                write_lo, write_hi = boxes_to_arrays([box for _, box in writes])
                w.drop_covered(write_lo, write_hi)
                r.drop_covered(write_lo, write_hi)
                w.add(write_lo, write_hi, np.array([t for t, _ in writes], dtype=np.int64))
            if reads:
                read_lo, read_hi = boxes_to_arrays([box for _, box in reads])
                r.add(read_lo, read_hi, np.array([t for t, _ in reads], dtype=np.int64))

    for task, producers in enumerate(deps):
        producers.discard(task)
    return deps


def _group_by_buffer(table: TaskTable, tasks: range, written: set[int]) -> dict[int, tuple[list, list]]:
    touched: dict[int, tuple[list, list]] = {}
    for task in tasks:
        for buffer, box, write in table.accesses[task]:
            if buffer in written:
                touched.setdefault(buffer, ([], []))[1 if write else 0].append((task, box))
    return touched


def _link(deps: list[set[int]], accesses: list, earlier: _Accesses) -> None:
    if len(earlier.task) == 0:
        return
    lo, hi = boxes_to_arrays([box for _, box in accesses])
    rows, cols = np.nonzero(overlap_matrix(lo, hi, earlier.lo, earlier.hi))
    for row, col in zip(rows.tolist(), cols.tolist()):
        deps[accesses[row][0]].add(int(earlier.task[col]))
