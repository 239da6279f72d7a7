"""Per-task timelines as Chrome/Perfetto traces (one track per worker)."""

from __future__ import annotations

import json
from pathlib import Path

from mpk.compiler.taskgraph import TaskGraph


def write_chrome_trace(tg: TaskGraph, records: list[tuple[int, int, int, int]], path: str | Path) -> Path:
    start = min(begin for _, _, begin, _ in records)
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"mpk {tg.graph.name} on {tg.target.name}"}}]
    for worker in range(tg.target.workers):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": worker, "args": {"name": f"worker {worker}"}})
    for task, worker, begin, end in records:
        op = tg.graph.ops[tg.op[task]] if tg.op[task] >= 0 else None
        events.append({
            "name": op.name if op else "relay", "cat": op.kind if op else "relay", "ph": "X", "pid": 0, "tid": worker,
            "ts": (begin - start) / 1e3, "dur": max(end - begin, 1) / 1e3,
            "args": {"task": task, "tile": list(tg.tile[task]), "wait": tg.wait[task], "signal": tg.signal[task]},
        })
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))
    return path
