"""Operator specs. Importing this package registers every operator kind in SPECS."""

from mpk.ops import activation, argmax, attention, embedding, encoder, linear, norm, split_attention  # noqa: F401
from mpk.ops.base import SPECS, Access, Cost, Op, OpSpec, Tile, TilingPlan, spec_of, task_kinds

__all__ = ["SPECS", "Access", "Cost", "Op", "OpSpec", "Tile", "TilingPlan", "spec_of", "task_kinds"]
