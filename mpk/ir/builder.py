"""A Python API that assembles an operator graph by hand, operator by operator.

The frontends use it to build Qwen3 and Llama graphs layer by layer; a model outside
the zoo can be built the same way::

    b = GraphBuilder("tiny", tokens=1)
    tokens = b.input("tokens", (1,), "int64")
    x = b.embedding(tokens, b.weight("embed", (256, 64), source=WeightSource(("model.embed_tokens.weight",))))
"""

from __future__ import annotations

from mpk.errors import GraphError
from mpk.ir.graph import OpGraph
from mpk.ir.tensor import TensorKind, TensorSpec, WeightSource
from mpk.ops import Op, spec_of


class GraphBuilder:
    def __init__(self, name: str, tokens: int, activation_dtype: str = "float32") -> None:
        if tokens < 1:
            raise GraphError(f"tokens per iteration must be at least 1, got {tokens}")
        self.name = name
        self.tokens = tokens
        self.activation_dtype = activation_dtype
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: list[Op] = []
        self.written: dict[str, str] = {}  # tensor -> first operator that writes it

    # declarations

    def _declare(self, spec: TensorSpec) -> str:
        if spec.name in self.tensors:
            raise GraphError(f"tensor {spec.name!r} is declared twice")
        if any(n <= 0 for n in spec.shape):
            raise GraphError(f"tensor {spec.name!r} has a non-positive dimension in shape {list(spec.shape)}")
        self.tensors[spec.name] = spec
        return spec.name

    def input(self, name: str, shape: tuple[int, ...], dtype: str = "int64") -> str:
        return self._declare(TensorSpec(name, tuple(shape), dtype, TensorKind.INPUT))

    def weight(self, name: str, shape: tuple[int, ...], dtype: str = "float32", source: WeightSource | None = None) -> str:
        return self._declare(TensorSpec(name, tuple(shape), dtype, TensorKind.WEIGHT, source or WeightSource((name,))))

    def state(self, name: str, shape: tuple[int, ...], dtype: str | None = None) -> str:
        return self._declare(TensorSpec(name, tuple(shape), dtype or self.activation_dtype, TensorKind.STATE))

    def mark_output(self, name: str) -> str:
        """Make an activation host-visible: it keeps its own memory and is read after each iteration."""
        spec = self.tensors[name]
        self.tensors[name] = TensorSpec(spec.name, spec.shape, spec.dtype, TensorKind.OUTPUT)
        return name

    # operators

    def add(self, kind: str, name: str, inputs: dict[str, str], outputs: dict[str, str] | None = None, **attrs) -> dict[str, str]:
        """Append one operator. Outputs not named in ``outputs`` become new activations called
        ``{name}.{role}``; returns the tensor bound to each output role.
        """
        spec = spec_of(kind)
        outputs = dict(outputs or {})
        for name_ in inputs.values():
            if name_ not in self.tensors:
                raise GraphError(f"operator {name!r} ({kind}) reads undeclared tensor {name_!r}")
        op = Op(kind, name, dict(inputs), outputs, dict(attrs))
        for role, (shape, dtype) in spec.infer(op, self.tensors).items():
            target = outputs.setdefault(role, f"{name}.{role}")
            if target not in self.tensors:
                self._declare(TensorSpec(target, tuple(shape), dtype or self.activation_dtype, TensorKind.ACTIVATION))
            self._check_output(op, spec, role, target, tuple(shape))
        for role in spec.outputs:
            target = outputs.get(role)
            if target is None:
                raise GraphError(f"operator {name!r} ({kind}) needs output role {role!r}")
            self._check_output(op, spec, role, target, self.tensors[target].shape)
            self.written.setdefault(target, name)
        self.ops.append(op)
        return outputs

    def _check_output(self, op: Op, spec, role: str, target: str, shape: tuple[int, ...]) -> None:
        tensor = self.tensors[target]
        if tensor.shape != shape:
            raise GraphError(f"operator {op.name!r} ({op.kind}): output {role} tensor {target!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        if tensor.kind in (TensorKind.INPUT, TensorKind.WEIGHT):
            raise GraphError(f"operator {op.name!r} ({op.kind}) writes {tensor.kind.value} tensor {target!r}, which is read-only")
        aliased = spec.inplace.get(role)
        in_place = aliased is not None and op.inputs.get(aliased) == target
        if target in self.written and not in_place and tensor.kind is not TensorKind.STATE:
            raise GraphError(
                f"operator {op.name!r} ({op.kind}) writes {target!r}, already written by {self.written[target]!r}; "
                f"write a new tensor instead (only the {spec.inplace or 'no'} in-place roles may update a tensor)"
            )
        if target in op.inputs.values() and not in_place:
            raise GraphError(f"operator {op.name!r} ({op.kind}) reads and writes {target!r} through roles that may not alias")

    def embedding(self, tokens: str, weight: str, name: str = "embedding") -> str:
        return self.add("embedding", name, {"tokens": tokens, "weight": weight})["out"]

    def rmsnorm(self, x: str, weight: str, eps: float, name: str) -> str:
        return self.add("rmsnorm", name, {"x": x, "weight": weight}, eps=eps)["out"]

    def linear(self, x: str, weight: str, name: str, residual: str | None = None, segments: list[int] | None = None, align: int = 1, out: str | None = None) -> str:
        inputs = {"x": x, "weight": weight}
        if residual is not None:
            inputs["residual"] = residual
        attrs = {"align": align}
        if segments is not None:
            attrs["segments"] = list(segments)
        outputs = {"out": out} if out else None
        return self.add("linear", name, inputs, outputs, **attrs)["out"]

    def qk_norm(self, qkv: str, q_weight: str, k_weight: str, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, name: str) -> str:
        inputs = {"qkv": qkv, "q_weight": q_weight, "k_weight": k_weight}
        return self.add("qk_norm", name, inputs, {"out": qkv}, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps)["out"]

    def rope(self, qkv: str, positions: str, cos: str, sin: str, k_cache: str, v_cache: str, *, num_heads: int, num_kv_heads: int, head_dim: int, name: str) -> str:
        inputs = {"qkv": qkv, "positions": positions, "cos": cos, "sin": sin}
        outputs = {"out": qkv, "k_cache": k_cache, "v_cache": v_cache}
        return self.add("rope", name, inputs, outputs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)["out"]

    def attention(self, qkv: str, positions: str, k_cache: str, v_cache: str, *, num_heads: int, num_kv_heads: int, head_dim: int, name: str) -> str:
        inputs = {"qkv": qkv, "positions": positions, "k_cache": k_cache, "v_cache": v_cache}
        return self.add("attention", name, inputs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)["out"]

    def silu_mul(self, gate_up: str, name: str, align: int = 1) -> str:
        return self.add("silu_mul", name, {"gate_up": gate_up}, align=align)["out"]

    def argmax(self, logits: str, name: str = "argmax", chunk: int = 4096) -> str:
        """Greedy token per row, as a partial step per chunk of the vocabulary and one reduce."""
        partial = self.add("argmax_partial", f"{name}.partial", {"logits": logits}, chunk=chunk)
        return self.add("argmax_reduce", f"{name}.reduce", {"values": partial["values"], "indices": partial["indices"]})["out"]

    def build(self, meta: dict | None = None) -> OpGraph:
        graph = OpGraph(self.name, self.tokens, dict(self.tensors), list(self.ops), dict(meta or {}))
        graph.validate()
        return graph
