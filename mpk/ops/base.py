"""The operator spec: everything the compiler and the runtimes know about one operator kind.

Each operator kind is described once, by a subclass of :class:`OpSpec` registered in
:data:`SPECS`. The task-kind numbering, the reference executor, the cost model and the
operator documentation are all derived from these specs, so adding an operator means
adding one spec (and its kernels), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mpk.errors import GraphError
from mpk.ir.region import Box
from mpk.ir.tensor import DTYPE_BYTES, TensorSpec

Tile = tuple[int, ...]


@dataclass
class Op:
    """One operator instance: a kind, a unique name, tensors by role, and attributes."""

    kind: str
    name: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    attrs: dict = field(default_factory=dict)

    def tensor_names(self) -> list[str]:
        return list(self.inputs.values()) + list(self.outputs.values())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "inputs": self.inputs, "outputs": self.outputs, "attrs": self.attrs}

    @classmethod
    def from_dict(cls, data: dict) -> "Op":
        return cls(data["kind"], data["name"], dict(data["inputs"]), dict(data["outputs"]), dict(data["attrs"]))


@dataclass(frozen=True)
class Access:
    """A box of the tensor bound to ``role`` that one task reads or writes."""

    role: str
    box: Box
    write: bool


@dataclass(frozen=True)
class Cost:
    """Work of one task: bytes moved to or from memory and floating-point operations."""

    bytes: int
    flops: int


@dataclass(frozen=True)
class TilingPlan:
    """What the tiler needs to know of the target.

    ``workers`` is the number of SMs or threads; ``min_columns`` is the narrowest
    column tile worth a task of its own (below it, task overhead dominates).
    """

    workers: int
    min_columns: int


class OpSpec:
    """Base class of operator specs. Subclasses set the class variables and methods."""

    kind: ClassVar[str]
    doc: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]]
    # Output role -> input role that may name the same tensor. Safe because each task
    # reads that input only inside the tile it writes.
    inplace: ClassVar[dict[str, str]] = {}
    attributes: ClassVar[tuple[str, ...]] = ()
    # Weight roles that are lookup tables, read one row per token rather than whole, and
    # the roles of the KV cache that a task reads up to the filled slots. The simulator's
    # memory floor counts bytes by them.
    gathered_weights: ClassVar[tuple[str, ...]] = ()
    kv_cache_roles: ClassVar[tuple[str, ...]] = ()
    cpu_kernel: ClassVar[str]
    cuda_kernel: ClassVar[str]

    def infer(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Check the input shapes and return the (shape, dtype) each output must have."""
        raise NotImplementedError

    def tiles(self, op: Op, tensors: dict[str, TensorSpec], plan: TilingPlan) -> list[Tile]:
        raise NotImplementedError

    def accesses(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> list[Access]:
        raise NotImplementedError

    def cost(self, op: Op, tensors: dict[str, TensorSpec], tile: Tile) -> Cost:
        """Default cost: every byte the task's accesses touch, no flops."""
        total = 0
        for access in self.accesses(op, tensors, tile):
            spec = tensors[role_tensor(op, access.role)]
            volume = 1
            for lo, hi in access.box:
                volume *= hi - lo
            total += volume * DTYPE_BYTES[spec.dtype]
        return Cost(total, 0)

    def run(self, op: Op, tile: Tile, bufs: dict[str, torch.Tensor]) -> None:
        """Execute one task with torch, on tensors bound by role (the reference semantics)."""
        raise NotImplementedError

    def cpu_call(self, op: Op, tensors: dict[str, TensorSpec], arg: "KernelArgs") -> str:
        """Return the C++ statement that runs one task of ``op`` on the CPU backend. It may use
        ``tile[i]``; shapes go in as template arguments, so they are compile-time constants.
        """
        return self.kernel_call(op, tensors, arg, "cpu")

    def cuda_call(self, op: Op, tensors: dict[str, TensorSpec], arg: "KernelArgs") -> str:
        """Return the CUDA statement that runs one task of ``op``, executed by every thread of
        the worker CTA; ``smem`` is the CTA's shared-memory scratch.
        """
        return self.kernel_call(op, tensors, arg, "cuda")

    def kernel_call(self, op: Op, tensors: dict[str, TensorSpec], arg: "KernelArgs", backend: str) -> str:
        """Return the statement of cpu_call or cuda_call, for a spec whose two kernels take
        the same arguments (``task_call`` builds it).
        """
        raise NotImplementedError

    def cuda_prefetch(self, op: Op, tensors: dict[str, TensorSpec], arg: "KernelArgs") -> str:
        """Return a CUDA statement that prefetches the task's weights into L2 before its wait
        event fires, or "" for operators whose reads all depend on events.
        """
        return ""

    def index_bounds(self, op: Op, tensors: dict[str, TensorSpec]) -> dict[str, IndexBound]:
        """Integer inputs whose values the kernels use as indices, by role. Executors check
        them before every iteration, because the kernels index memory with them unchecked.
        """
        return {}

    def describe_tile(self, op: Op, tile: Tile) -> str:
        return ",".join(str(v) for v in tile)


@dataclass(frozen=True)
class IndexBound:
    """Bounds of an index input: its values must lie in [lo, hi). ``lo`` is None where
    negative values mark padding rows. ``indexes`` names what they index, for error messages.
    """

    lo: int | None
    hi: int
    indexes: str


class KernelArgs:
    """C++ expressions for an operator's tensors, supplied by a code generator."""

    def pointer(self, role: str) -> str:
        raise NotImplementedError

    def element(self, role: str) -> str:
        """The C++ element type of the tensor bound to ``role`` (float, mpk::bf16, __nv_bfloat16, int64_t)."""
        raise NotImplementedError

    def packed(self, role: str) -> bool:
        """Return whether the backend stores the weight bound to ``role`` packed into panels
        (K-major blocks of output columns) instead of row-major.
        """
        return False


def task_call(backend: str, kernel: str, template_args: list, args: list[str]) -> str:
    """Return the statement that calls mpk::<backend>::<kernel><template_args>(args). On
    the cuda backend the worker CTA's shared memory, ``smem``, goes last.
    """
    arguments = [*args, "smem"] if backend == "cuda" else list(args)
    return f"mpk::{backend}::{kernel}<{', '.join(str(a) for a in template_args)}>({', '.join(arguments)});"


def cpp_float(value: float) -> str:
    return f"static_cast<float>({float(value)!r})"


SPECS: dict[str, OpSpec] = {}


def register(cls: type[OpSpec]) -> type[OpSpec]:
    SPECS[cls.kind] = cls()
    return cls


def spec_of(kind: str) -> OpSpec:
    try:
        return SPECS[kind]
    except KeyError:
        raise GraphError(f"unknown operator kind {kind!r}; known kinds: {', '.join(sorted(SPECS))}") from None


def task_kinds() -> list[str]:
    """Return the operator kinds in the order that numbers task kinds in generated code."""
    return sorted(SPECS)


def role_tensor(op: Op, role: str) -> str:
    if role in op.inputs:
        return op.inputs[role]
    return op.outputs[role]


def expect_shape(op: Op, role: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if spec.shape != shape:
        raise GraphError(
            f"operator {op.name!r} ({op.kind}): {role} tensor {spec.name!r} has shape {list(spec.shape)}, "
            f"expected {list(shape)}"
        )


def expect_rank(op: Op, role: str, spec: TensorSpec, rank: int) -> None:
    if len(spec.shape) != rank:
        raise GraphError(
            f"operator {op.name!r} ({op.kind}): {role} tensor {spec.name!r} has shape {list(spec.shape)}, "
            f"expected {rank} dimensions"
        )


def attr(op: Op, name: str) -> object:
    try:
        return op.attrs[name]
    except KeyError:
        raise GraphError(f"operator {op.name!r} ({op.kind}) is missing attribute {name!r}") from None
