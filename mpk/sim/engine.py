"""Discrete-event simulation of the megakernel: static assignment and dynamic dispatch.

Both models advance a clock over task completions (and, for dynamic dispatch, event
firings) kept in a heap, so every time is exact for the given task durations: nothing
is sampled. An event fires when its last trigger completes; BEGIN fires at time 0.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from mpk.errors import SimulationError
from mpk.sim.workload import BEGIN, Workload


@dataclass(frozen=True)
class Timeline:
    """Worker, start and end time of every task, in seconds from the start of the iteration."""

    worker: list[int]
    start: list[float]
    end: list[float]

    @property
    def makespan(self) -> float:
        return max(self.end, default=0.0)


def run_static(work: Workload, event_latency: float, prefetch: bool = True) -> Timeline:
    """Simulate static assignment: each worker runs its tasks in global order, and a task
    starts once its worker is free and ``event_latency`` has passed since its wait event
    fired (no latency for BEGIN, which the host set before the launch).

    With ``prefetch``, a worker that waits for its next task's event spends the wait on
    that task's event-independent loads (``work.prefetch``), up to all of them. The task
    then runs for the rest of its time. This models the CUDA backend's weight prefetch
    into L2. The timeline's start is when the task's event-dependent part begins.
    """
    queues: list[list[int]] = [[] for _ in range(work.workers)]
    for task in range(work.num_tasks):
        queues[work.worker[task]].append(task)
    position = [0] * work.workers
    free = [0.0] * work.workers
    ready: list[float | None] = [None] * work.num_events
    ready[BEGIN] = 0.0
    parked: dict[int, list[int]] = {}     # event -> workers whose next task waits on it
    pending = list(work.num_triggers)
    start, end = [0.0] * work.num_tasks, [0.0] * work.num_tasks
    running: list[tuple[float, int, int]] = []   # (end, task, worker)

    def start_next(w: int) -> None:
        if position[w] == len(queues[w]):
            return
        task = queues[w][position[w]]
        at = ready[work.wait[task]]
        if at is None:
            parked.setdefault(work.wait[task], []).append(w)
            return
        start[task] = max(free[w], at)
        overlap = min(work.prefetch_seconds(task), start[task] - free[w]) if prefetch else 0.0
        end[task] = start[task] + work.seconds[task] - overlap
        heapq.heappush(running, (end[task], task, w))

    for w in range(work.workers):
        start_next(w)
    while running:
        now, task, w = heapq.heappop(running)
        free[w] = now
        position[w] += 1
        event = work.signal[task]
        pending[event] -= 1
        if pending[event] == 0:
            ready[event] = now + event_latency
            for waiting in parked.pop(event, []):
                start_next(waiting)
        start_next(w)

    _check_finished(work, queues, position)
    return Timeline(list(work.worker), start, end)


def run_dynamic(work: Workload, dispatch_latency: float) -> Timeline:
    """Simulate dynamic dispatch: when an event fires, its consumers go, in global order,
    to the workers that become free first, each starting no earlier than
    ``dispatch_latency`` after the event (BEGIN's consumers start at time 0). The
    static assignment in ``work.worker`` is ignored.
    """
    consumers = work.consumers()
    free = [(0.0, w) for w in range(work.workers)]    # (free from, worker), a heap
    fired: list[tuple[float, int]] = [(0.0, BEGIN)]    # (time, event), a heap
    pending = list(work.num_triggers)
    last_trigger = [0.0] * work.num_events
    worker, start, end = [-1] * work.num_tasks, [0.0] * work.num_tasks, [0.0] * work.num_tasks

    while fired:
        when, event = heapq.heappop(fired)
        ready = when if event == BEGIN else when + dispatch_latency
        for task in consumers[event]:
            available, w = heapq.heappop(free)
            worker[task] = w
            start[task] = max(available, ready)
            end[task] = start[task] + work.seconds[task]
            heapq.heappush(free, (end[task], w))
            signal = work.signal[task]
            pending[signal] -= 1
            last_trigger[signal] = max(last_trigger[signal], end[task])
            if pending[signal] == 0:
                heapq.heappush(fired, (last_trigger[signal], signal))

    stuck = [task for task in range(work.num_tasks) if worker[task] < 0]
    if stuck:
        task = stuck[0]
        raise SimulationError(
            f"{len(stuck)} tasks never run under dynamic dispatch, first {work.label(task)}: its wait event "
            f"{work.wait[task]} never fires because the events form a cycle"
        )
    return Timeline(worker, start, end)


def _check_finished(work: Workload, queues: list[list[int]], position: list[int]) -> None:
    for w, queue in enumerate(queues):
        if position[w] < len(queue):
            task = queue[position[w]]
            raise SimulationError(
                f"static assignment deadlocks: worker {w} waits forever at {work.label(task)} on event "
                f"{work.wait[task]}, whose triggers never run; each worker's tasks must follow the global "
                "order, with every event's triggers before its consumers"
            )
