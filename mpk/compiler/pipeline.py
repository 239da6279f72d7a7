"""The compiler driver: operator graph + target -> verified task graph."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mpk.compiler.events import EventPlan, build_events
from mpk.compiler.hazards import find_dependencies
from mpk.compiler.memory import plan_memory
from mpk.compiler.schedule import assign, critical_path, event_critical_path, linearize
from mpk.compiler.taskgraph import TaskGraph
from mpk.compiler.tasks import NO_OP, TaskTable, make_tasks
from mpk.compiler.verify import verify
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorKind
from mpk.target import Target

log = logging.getLogger("mpk.compiler")


@dataclass(frozen=True)
class CompileOptions:
    share_memory: bool = True   # let activations with disjoint lifetimes share buffers
    track_war: bool = True      # off only to show that the verifier catches the races
    verify: bool = True


def compile_graph(graph: OpGraph, target: Target, options: CompileOptions = CompileOptions()) -> TaskGraph:
    timings: dict[str, float] = {}

    def timed(step: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[step] = time.perf_counter() - start
        return result

    placement = timed("memory", plan_memory, graph, options.share_memory)
    table: TaskTable = timed("tiling", make_tasks, graph, placement, target)
    buffer_names = list(placement.buffers)
    written = {buffer_names.index(placement.home[name]) for op in graph.ops for name in op.outputs.values()}
    deps = timed("dependencies", find_dependencies, table, written, options.track_war)
    plan: EventPlan = timed("events", build_events, deps, table.op)
    tg = timed("schedule", _schedule, graph, placement, target, table, plan, deps)
    if options.verify:
        timed("verify", verify, tg)
    tg.stats["compile_seconds"] = timings
    log.info("compiled %s for %s: %d tasks, %d events in %.2f s", graph.name, target.name, tg.num_tasks, tg.num_events, sum(timings.values()))
    return tg


def _schedule(graph: OpGraph, placement, target: Target, table: TaskTable, plan: EventPlan, deps) -> TaskGraph:
    relays = len(plan.wait) - len(table)
    seconds = table.seconds + [target.task_overhead] * relays
    # Relays sit in program order right after the last producer they forward.
    program_key = list(range(len(table))) + [max(group) + 0.5 for group in plan.relay_groups]
    order, event_order = linearize(plan, program_key)
    schedule = assign(order, plan, seconds, target.workers, target.event_latency)

    renumber = {e: i for i, e in enumerate(event_order)}
    position = {task: i for i, task in enumerate(order)}
    num_events = len(event_order)
    first, last = [0] * num_events, [0] * num_events
    for e, new in renumber.items():
        members = [position[c] for c in plan.consumers[e]]
        first[new], last[new] = (min(members), max(members) + 1) if members else (len(order), len(order))
    num_triggers = [0] * num_events
    num_triggers[0] = 1  # the host
    for e, new in renumber.items():
        if new:
            num_triggers[new] = len(plan.triggers[e])

    ops = [table.op[t] if t < len(table) else NO_OP for t in order]
    tiles = [table.tile[t] if t < len(table) else () for t in order]
    exact = critical_path(deps, table.seconds)
    with_events = event_critical_path(plan, order, seconds, target.event_latency)
    stats = dict(plan.stats)
    stats.update({
        "tasks": len(order),
        "critical_path_seconds": exact,
        "event_critical_path_seconds": with_events,
        "estimated_makespan_seconds": schedule.makespan,
        "worker_load_seconds": schedule.load,
        "weight_bytes": sum(b.nbytes for b in placement.buffers.values() if b.kind is TensorKind.WEIGHT),
    })
    return TaskGraph(
        graph=graph, placement=placement, target=target, op=ops, tile=tiles,
        wait=[renumber[plan.wait[t]] for t in order], signal=[renumber[plan.signal[t]] for t in order],
        worker=schedule.worker, seconds=[seconds[t] for t in order],
        num_triggers=num_triggers, first=first, last=last, stats=stats,
    )
