"""A simulated megakernel timeline as a Chrome/Perfetto trace, one track per SM, written
by the same writer as the backends' measured traces.
"""

from __future__ import annotations

from pathlib import Path

from mpk.compiler.taskgraph import TaskGraph
from mpk.runtime.trace import write_chrome_trace
from mpk.sim.models import Prediction


def write_simulated_trace(tg: TaskGraph, prediction: Prediction, path: str | Path) -> Path:
    """Write a megakernel prediction's per-task timeline (times rounded to nanoseconds)."""
    timeline = prediction.timeline
    if timeline is None:
        raise ValueError(f"the {prediction.model} prediction has no per-task timeline to trace")
    records = [
        (task, timeline.worker[task], round(timeline.start[task] * 1e9), round(timeline.end[task] * 1e9))
        for task in range(len(timeline.start))
    ]
    return write_chrome_trace(tg, records, path)
