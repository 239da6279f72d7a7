"""Human-readable summary of a compiled task graph."""

from __future__ import annotations

from collections import Counter

from mpk.compiler.taskgraph import TaskGraph

MAX_LISTED_WORKERS = 16


def summarize(tg: TaskGraph) -> str:
    stats = tg.stats
    kinds = Counter(op.kind for op in tg.graph.ops)
    tasks_per_kind: Counter = Counter(tg.graph.ops[o].kind if o >= 0 else "relay" for o in tg.op)
    lines = [
        f"task graph {tg.graph.name}: {tg.graph.tokens} token(s) per iteration, target {tg.target.name} ({tg.target.workers} workers)",
        "",
        f"operators: {len(tg.graph.ops)}",
    ]
    for kind in sorted(tasks_per_kind):
        lines.append(f"  {kind:16s} {kinds.get(kind, 0):6d} ops {tasks_per_kind[kind]:8d} tasks")
    lines += [
        f"tasks: {tg.num_tasks} ({stats.get('relay_tasks', 0)} relays)",
        f"events: {tg.num_events} (fused from {stats.get('fused_events', '?')} producer sets, {stats.get('merged_events', 0)} merges; "
        f"{stats.get('coarsened_consumers', 0)} tasks wait for more than their exact producers)",
        f"dependency edges: {stats.get('exact_edges', '?')} exact, {stats.get('reduced_edges', '?')} after transitive reduction",
    ]
    exact = stats.get("critical_path_seconds", 0.0)
    coarse = stats.get("event_critical_path_seconds", 0.0)
    loss = (coarse / exact - 1) * 100 if exact else 0.0
    lines += [
        f"critical path (cost model): {exact * 1e6:.1f} us exact, {coarse * 1e6:.1f} us through events (+{loss:.1f}% from coarsening)",
        f"estimated makespan: {stats.get('estimated_makespan_seconds', 0.0) * 1e6:.1f} us",
        "",
        "per-worker load (cost model):",
    ]
    counts = Counter(tg.worker)
    loads = stats.get("worker_load_seconds", [])
    workers = list(range(tg.target.workers))
    if len(workers) > MAX_LISTED_WORKERS:
        # Show the extremes: the most and the least loaded workers.
        workers.sort(key=lambda w: loads[w] if w < len(loads) else 0.0)
        half = MAX_LISTED_WORKERS // 2
        lines.append(f"  ({half} least and {half} most loaded of {tg.target.workers} workers)")
        workers = workers[:half] + workers[-half:]
    for w in workers:
        load = loads[w] * 1e6 if w < len(loads) else 0.0
        lines.append(f"  worker {w:4d}: {counts.get(w, 0):6d} tasks {load:10.1f} us")
    if loads:
        mean = sum(loads) / len(loads)
        lines.append(f"  imbalance (max/mean): {max(loads) / mean if mean else 0:.2f}")
    return "\n".join(lines)
