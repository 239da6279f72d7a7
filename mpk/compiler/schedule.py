"""Linearization and static assignment.

The global order emits each event's consumers as one contiguous block, event by event,
as soon as all of its triggers are emitted; ties go to the block that comes first in
program order. Workers then take tasks in that order by list scheduling on the cost
model, so every worker's list is a subsequence of the global order (which, with all
workers resident, rules out deadlock: the earliest unfinished task is always at the
head of its worker's list and everything it waits for is done).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from mpk.compiler.events import BEGIN, EventPlan
from mpk.errors import CompileError


@dataclass
class Schedule:
    order: list[int]          # task ids (of the event plan) in global order
    event_order: list[int]    # event ids in the order their consumer blocks appear
    worker: list[int]         # per position in the global order
    finish: list[float]       # estimated finish time per position, seconds
    load: list[float]         # busy seconds per worker
    makespan: float


def linearize(plan: EventPlan, program_key: list[float]) -> tuple[list[int], list[int]]:
    """Return the global task order and the order of events. ``program_key`` ranks tasks
    (and relays) in program order.
    """
    pending = [len(t) for t in plan.triggers]
    pending[BEGIN] = 0
    block_key = [min((program_key[c] for c in consumers), default=float("inf")) for consumers in plan.consumers]
    ready = [(block_key[BEGIN], BEGIN)]
    order: list[int] = []
    event_order: list[int] = []
    while ready:
        _, e = heapq.heappop(ready)
        event_order.append(e)
        for task in sorted(plan.consumers[e], key=program_key.__getitem__):
            order.append(task)
            s = plan.signal[task]
            pending[s] -= 1
            if pending[s] == 0 and s != plan.end:
                heapq.heappush(ready, (block_key[s], s))
    if len(order) != len(plan.wait):
        stuck = [e for e in range(len(pending)) if pending[e] > 0 and e != plan.end][:5]
        raise CompileError(f"the event graph has a cycle: {len(plan.wait) - len(order)} tasks never become ready (events {stuck})")
    event_order.append(plan.end)
    return order, event_order


def assign(order: list[int], plan: EventPlan, seconds: list[float], workers: int, event_latency: float) -> Schedule:
    """List-schedule the global order onto workers: each task goes to the worker that can
    finish it first, preferring the least loaded one among equals.
    """
    free = np.zeros(workers)
    load = np.zeros(workers)
    ready_at = [0.0] * (plan.end + 1)
    worker: list[int] = []
    finish: list[float] = []
    for task in order:
        start = np.maximum(free, ready_at[plan.wait[task]])
        done = start + seconds[task]
        candidates = np.flatnonzero(done <= done.min() + 1e-12)
        w = int(candidates[np.argmin(load[candidates])])
        free[w] = done[w]
        load[w] += seconds[task]
        worker.append(w)
        finish.append(float(done[w]))
        s = plan.signal[task]
        ready_at[s] = max(ready_at[s], float(done[w]) + event_latency)
    return Schedule(order, [], worker, finish, load.tolist(), float(free.max()))


def critical_path(deps: list[set[int]], seconds: list[float]) -> float:
    """Return the longest chain of exact dependencies in seconds: the latency with unlimited workers."""
    longest = [0.0] * len(deps)
    for t, producers in enumerate(deps):
        longest[t] = seconds[t] + max((longest[p] for p in producers), default=0.0)
    return max(longest, default=0.0)


def event_critical_path(plan: EventPlan, order: list[int], seconds: list[float], event_latency: float) -> float:
    """Return the longest chain through the events in seconds. It exceeds the exact critical path where
    event coarsening or relays make a task wait for more than it needs.
    """
    fired = [0.0] * (plan.end + 1)
    for task in order:
        done = fired[plan.wait[task]] + seconds[task]
        s = plan.signal[task]
        fired[s] = max(fired[s], done + event_latency)
    return fired[plan.end]
