"""Tensor declarations of an operator graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}


class TensorKind(str, Enum):
    INPUT = "input"            # written by the host before each iteration
    OUTPUT = "output"          # read by the host after each iteration
    WEIGHT = "weight"          # read-only, loaded once
    ACTIVATION = "activation"  # scratch within one iteration; may share memory with others
    STATE = "state"            # persists across iterations (the KV cache)


@dataclass(frozen=True)
class WeightSource:
    """Where a weight's values come from.

    ``names`` lists checkpoint tensors concatenated along dim 0 (a fused QKV or
    gate/up projection has several). ``generator`` instead names a table that the
    loader computes, such as ``rope_cos``; ``params`` are its arguments.
    """

    names: tuple[str, ...] = ()
    generator: str = ""
    params: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "generator": self.generator, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict) -> "WeightSource":
        return cls(tuple(data["names"]), data["generator"], data["params"])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: TensorKind
    source: WeightSource | None = None

    @property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind.value}
        if self.source is not None:
            data["source"] = self.source.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        source = WeightSource.from_dict(data["source"]) if "source" in data else None
        return cls(data["name"], tuple(data["shape"]), data["dtype"], TensorKind(data["kind"]), source)
