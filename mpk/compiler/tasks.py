"""Tiling: every operator becomes tasks, one per output tile, with the regions they touch."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpk.compiler.memory import Placement
from mpk.errors import CompileError
from mpk.ir.graph import OpGraph
from mpk.ir.region import Box
from mpk.ops import Cost, spec_of
from mpk.ops.base import role_tensor
from mpk.target import Target

# A task touches a physical buffer (by index) in a box, reading or writing it.
BufferAccess = tuple[int, Box, bool]

NO_OP = -1  # op index of a relay task, which only forwards an event


@dataclass
class TaskTable:
    """Tasks in program order: all tasks of operator 0, then of operator 1, ..."""

    op: list[int] = field(default_factory=list)
    tile: list[tuple[int, ...]] = field(default_factory=list)
    accesses: list[list[BufferAccess]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    op_tasks: list[range] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.op)


def make_tasks(graph: OpGraph, placement: Placement, target: Target) -> TaskTable:
    buffer_index = {name: i for i, name in enumerate(placement.buffers)}
    table = TaskTable()
    for index, op in enumerate(graph.ops):
        spec = spec_of(op.kind)
        first = len(table.op)
        tiles = spec.tiles(op, graph.tensors, target.tiling)
        if not tiles:
            raise CompileError(f"operator {op.name!r} ({op.kind}) produced no tiles")
        for tile in tiles:
            tile = tuple(tile)
            accesses = []
            for access in spec.accesses(op, graph.tensors, tile):
                buffer = buffer_index[placement.home[role_tensor(op, access.role)]]
                accesses.append((buffer, access.box, access.write))
            cost: Cost = spec.cost(op, graph.tensors, tile)
            table.op.append(index)
            table.tile.append(tile)
            table.accesses.append(accesses)
            table.seconds.append(target.task_seconds(cost.bytes, cost.flops))
        table.op_tasks.append(range(first, len(table.op)))
    return table
