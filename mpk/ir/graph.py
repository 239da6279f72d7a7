"""The operator graph of one iteration: tensors and operators in program order."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpk.errors import GraphError
from mpk.ir.tensor import TensorKind, TensorSpec
from mpk.ops import Op, spec_of


@dataclass
class OpGraph:
    """Operators in program order over named tensors.

    ``tokens`` is the number of rows (tokens) one iteration processes; ``meta`` carries
    what the runtime needs besides the graph (the model config, the cache length).
    """

    name: str
    tokens: int
    tensors: dict[str, TensorSpec]
    ops: list[Op]
    meta: dict = field(default_factory=dict)

    def tensors_of(self, kind: TensorKind) -> list[TensorSpec]:
        return [t for t in self.tensors.values() if t.kind is kind]

    def validate(self) -> None:
        """Check that every operator is known, binds existing tensors of the right shapes,
        and that names are unique.
        """
        seen: set[str] = set()
        for op in self.ops:
            if op.name in seen:
                raise GraphError(f"two operators are named {op.name!r}; operator names must be unique")
            seen.add(op.name)
            spec = spec_of(op.kind)
            for role in (*spec.inputs, *spec.outputs):
                if role not in op.inputs and role not in op.outputs:
                    raise GraphError(f"operator {op.name!r} ({op.kind}) does not bind required role {role!r}")
            for name in op.tensor_names():
                if name not in self.tensors:
                    raise GraphError(f"operator {op.name!r} ({op.kind}) uses undeclared tensor {name!r}")
            inferred = spec.infer(op, self.tensors)
            for role, (shape, _) in inferred.items():
                tensor = self.tensors[op.outputs[role]]
                if tensor.shape != tuple(shape):
                    raise GraphError(
                        f"operator {op.name!r} ({op.kind}): output {role} tensor {tensor.name!r} has shape "
                        f"{list(tensor.shape)}, expected {list(shape)}"
                    )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "tensors": [t.to_dict() for t in self.tensors.values()],
            "ops": [op.to_dict() for op in self.ops],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "OpGraph":
        tensors = {t["name"]: TensorSpec.from_dict(t) for t in data["tensors"]}
        return cls(data["name"], data["tokens"], tensors, [Op.from_dict(o) for o in data["ops"]], data["meta"])
