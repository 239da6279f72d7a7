"""The task graph: the compiled artifact that every runtime executes.

Tasks are stored in the global order, so a task's id is its position; the consumers of
event e are the tasks ``first[e] <= id < last[e]``. Event 0 (BEGIN) is signaled by the
host once the iteration's inputs are written; the last event (END) is waited on by the
host. Counters are monotone: in iteration k (from 1) a task may start once its wait
counter reaches ``num_triggers * k``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mpk.compiler.memory import Placement
from mpk.errors import MpkError
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorSpec
from mpk.target import Target

FORMAT = "mpk-taskgraph"
VERSION = 1
FILENAME = "taskgraph.json"


@dataclass
class TaskGraph:
    graph: OpGraph
    placement: Placement
    target: Target
    op: list[int]                       # operator index per task; -1 for a relay
    tile: list[tuple[int, ...]]
    wait: list[int]
    signal: list[int]
    worker: list[int]
    seconds: list[float]                # cost-model estimate per task
    num_triggers: list[int]             # per event
    first: list[int]                    # per event: first consumer
    last: list[int]                     # per event: one past the last consumer
    stats: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.op)

    @property
    def num_events(self) -> int:
        return len(self.num_triggers)

    @property
    def end(self) -> int:
        return self.num_events - 1

    def task_label(self, task: int) -> str:
        if self.op[task] < 0:
            return f"task {task} (relay)"
        op = self.graph.ops[self.op[task]]
        return f"task {task} ({op.name} tile {list(self.tile[task])})"

    def worker_tasks(self, worker: int) -> list[int]:
        return [t for t in range(self.num_tasks) if self.worker[t] == worker]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "graph": self.graph.to_dict(),
            "placement": {
                "buffers": [b.to_dict() for b in self.placement.buffers.values()],
                "home": self.placement.home,
            },
            "target": self.target.to_dict(),
            "tasks": {
                "op": self.op, "tile": [list(t) for t in self.tile], "wait": self.wait,
                "signal": self.signal, "worker": self.worker, "seconds": self.seconds,
            },
            "events": {"num_triggers": self.num_triggers, "first": self.first, "last": self.last},
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TaskGraph":
        buffers = {b["name"]: TensorSpec.from_dict(b) for b in data["placement"]["buffers"]}
        tasks, events = data["tasks"], data["events"]
        return cls(
            graph=OpGraph.from_dict(data["graph"]),
            placement=Placement(buffers, dict(data["placement"]["home"])),
            target=Target.from_dict(data["target"]),
            op=list(tasks["op"]), tile=[tuple(t) for t in tasks["tile"]], wait=list(tasks["wait"]),
            signal=list(tasks["signal"]), worker=list(tasks["worker"]), seconds=list(tasks["seconds"]),
            num_triggers=list(events["num_triggers"]), first=list(events["first"]), last=list(events["last"]),
            stats=dict(data.get("stats", {})),
        )

    def save(self, directory: str | Path) -> Path:
        """Write the task graph to ``directory/taskgraph.json`` (atomically: a crash leaves
        no half-written file behind).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        partial.replace(path)
        return path


class TaskGraphFileError(MpkError):
    """A task graph file is missing, corrupted or of another format version."""


def load_task_graph(path: str | Path) -> TaskGraph:
    """Read a task graph from a file or from a directory holding ``taskgraph.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise TaskGraphFileError(f"task graph not found: {path}; create it with `mpk compile MODEL_DIR --out DIR`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskGraphFileError(f"{path} is not a readable task graph (invalid JSON: {exc}); compile it again with `mpk compile`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TaskGraphFileError(f"{path} is not an mpk task graph (no format {FORMAT!r} field)")
    if data.get("version") != VERSION:
        raise TaskGraphFileError(f"task graph {path} has format version {data.get('version')}, this mpk reads version {VERSION}; compile it again")
    try:
        tg = TaskGraph.from_dict(data)
    except KeyError as exc:
        raise TaskGraphFileError(f"task graph {path} is corrupted: field {exc.args[0]!r} is missing; compile it again") from None
    except (TypeError, ValueError) as exc:
        raise TaskGraphFileError(f"task graph {path} is corrupted: a field has the wrong type ({exc}); compile it again") from None
    _check_consistent(tg, path)
    return tg


def _check_consistent(tg: TaskGraph, path: Path) -> None:
    """Reject a file whose columns do not fit together (a hand edit, another tool)."""
    from mpk.compiler.verify import check_structure
    from mpk.errors import MpkError

    try:
        check_structure(tg)
    except MpkError as exc:
        raise TaskGraphFileError(f"task graph {path} is inconsistent: {exc}; compile it again") from None
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise TaskGraphFileError(f"task graph {path} is inconsistent ({type(exc).__name__}: {exc}); compile it again") from None
