"""The CPU backend: a task graph built into a shared library, run by persistent threads."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import torch

from mpk.backends.cpu.build import build_library
from mpk.backends.cpu.codegen import describe_buffers, generate_source, pack_panels, panel_weights
from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import MpkError, RuntimeStallError
from mpk.ir.tensor import TensorKind
from mpk.runtime.inputs import check_inputs, index_bounds
from mpk.runtime.trace import write_chrome_trace

log = logging.getLogger("mpk.backends.cpu")

MODES = {"static": 0, "dynamic": 1}
MAX_TILE = 4  # kMaxTile in protocol.h
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


class _Config(ctypes.Structure):
    _fields_ = [
        ("num_workers", ctypes.c_int32), ("mode", ctypes.c_int32), ("num_schedulers", ctypes.c_int32),
        ("pin_threads", ctypes.c_int32), ("trace", ctypes.c_int32), ("watchdog_ns", ctypes.c_uint64),
        ("max_delay_ns", ctypes.c_uint64),
    ]


class _StallReport(ctypes.Structure):
    _fields_ = [
        ("worker", ctypes.c_int32), ("task", ctypes.c_int32), ("event", ctypes.c_int32), ("first_unfired", ctypes.c_int32),
        ("counter", ctypes.c_uint64), ("target", ctypes.c_uint64),
        ("first_unfired_counter", ctypes.c_uint64), ("first_unfired_target", ctypes.c_uint64),
    ]


class _TraceRecord(ctypes.Structure):
    _fields_ = [("task", ctypes.c_int32), ("worker", ctypes.c_int32), ("begin_ns", ctypes.c_uint64), ("end_ns", ctypes.c_uint64)]


def weight_storage(dtype: str) -> str:
    """Return the dtype the CPU kernels read a weight in: bf16 stays bf16, the rest becomes fp32."""
    return "bfloat16" if dtype == "bfloat16" else "float32"


class CpuExecutor:
    """Runs iterations of one task graph. Outputs returned by run() are views of the
    runtime's buffers, overwritten by the next iteration.
    """

    def __init__(self, tg: TaskGraph, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *,
                 mode: str = "static", schedulers: int = 1, trace: bool = False, watchdog_seconds: float = 10.0,
                 max_delay_ns: int = 0, pin_threads: bool = True, sanitize: str | None = None) -> None:
        if mode not in MODES:
            raise MpkError(f"unknown scheduling mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "dynamic" and schedulers < 1:
            raise MpkError(f"dynamic scheduling needs at least 1 scheduler thread, got {schedulers}")
        self.tg = tg
        weight_dtypes = {name: weight_storage(str(w.dtype).removeprefix("torch.")) for name, w in weights.items()}
        self.library_path = build_library(generate_source(tg, weight_dtypes), sanitize)
        self.lib = _load(self.library_path)
        self.buffers = self._allocate(weights, state, weight_dtypes)
        self.trace_enabled = trace
        self.trace: list[tuple[int, int, int, int]] = []
        self._tables = _task_tables(tg)
        pointers = [t.data_ptr() for t in self.buffers.values()]
        self._pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        config = _Config(tg.target.workers, MODES[mode], schedulers, int(pin_threads), int(trace),
                         int(watchdog_seconds * 1e9), int(max_delay_ns))
        tasks, events, workers = self._tables
        self.handle = self.lib.mpk_create(
            tg.num_tasks, tasks.ctypes.data, tg.num_events, events.ctypes.data, workers.ctypes.data,
            self._pointers, len(pointers), ctypes.byref(config),
        )
        self.outputs = {s.name: self.buffers[s.name] for s in tg.placement.buffers.values() if s.kind is TensorKind.OUTPUT}
        self.watchdog_seconds = watchdog_seconds
        self.bounds = index_bounds(tg)

    def _allocate(self, weights, state, weight_dtypes) -> dict[str, torch.Tensor]:
        buffers: dict[str, torch.Tensor] = {}
        panels = panel_weights(self.tg)
        for name, spec, dtype in describe_buffers(self.tg, weight_dtypes):
            if spec.kind is TensorKind.WEIGHT:
                tensor = weights[name].to(TORCH_DTYPES[dtype]).contiguous()
                if tuple(tensor.shape) != spec.shape:
                    raise MpkError(f"weight {name!r} has shape {list(tensor.shape)}, the task graph expects {list(spec.shape)}")
                if name in panels:
                    buffers[name] = pack_panels(tensor)
                    continue
            elif spec.kind is TensorKind.STATE:
                tensor = state[name]
                if tensor.dtype != torch.float32 or not tensor.is_contiguous():
                    raise MpkError(f"state tensor {name!r} must be contiguous float32 for the CPU backend")
            else:
                tensor = torch.empty(spec.shape, dtype=TORCH_DTYPES[dtype])
            if tuple(tensor.shape) != spec.shape:
                raise MpkError(f"buffer {name!r} has shape {list(tensor.shape)}, the task graph expects {list(spec.shape)}")
            buffers[name] = tensor
        return buffers

    def run(self, inputs: dict[str, torch.Tensor], poison: bool = False) -> dict[str, torch.Tensor]:
        """Run one iteration. ``poison`` fills activations and outputs with NaN (or -1)
        first, so a task that reads what no task wrote shows up in the result.
        """
        if poison:
            for spec in self.tg.placement.buffers.values():
                if spec.kind in (TensorKind.ACTIVATION, TensorKind.OUTPUT):
                    buffer = self.buffers[spec.name]
                    buffer.fill_(float("nan") if buffer.is_floating_point() else -1)
        for name, value in check_inputs(self.tg, inputs, self.bounds).items():
            self.buffers[name].copy_(value)
        status = self.lib.mpk_run(self.handle)
        if status != 0:
            raise self._stall_error()
        if self.trace_enabled:
            self._collect_trace()
        return self.outputs

    def _stall_error(self) -> RuntimeStallError:
        report = _StallReport()
        self.lib.mpk_stall_report(self.handle, ctypes.byref(report))
        tg = self.tg
        task = tg.task_label(report.task) if report.task >= 0 else "the end of the iteration"
        if report.worker >= 0:
            who, bound = f"worker {report.worker}", self.watchdog_seconds
        else:
            who, bound = "the host", 2 * self.watchdog_seconds
        cause = ""
        if report.first_unfired >= 0:
            e = report.first_unfired
            consumers = tg.task_label(tg.first[e]) if tg.last[e] > tg.first[e] else "the host"
            cause = (f"; the earliest event that has not fired is event {e} (counter {report.first_unfired_counter}, "
                     f"target {report.first_unfired_target}), which releases {consumers}")
        return RuntimeStallError(
            f"watchdog: {who} waited more than {bound:g} s on event {report.event} for {task}: counter "
            f"{report.counter}, target {report.target}{cause}; the runtime is stopped, create a new executor to continue"
        )

    def _collect_trace(self) -> None:
        capacity = self.tg.num_tasks
        records = (_TraceRecord * capacity)()
        self.trace = []
        for worker in range(self.tg.target.workers):
            count = self.lib.mpk_trace(self.handle, worker, records, capacity)
            self.trace.extend((r.task, r.worker, r.begin_ns, r.end_ns) for r in records[:count])

    def write_trace(self, path: str | Path) -> Path:
        """Write the last iteration's per-task timeline as a Chrome/Perfetto trace (JSON)."""
        if not self.trace:
            raise MpkError("no trace recorded: create the executor with trace=True and run an iteration")
        return write_chrome_trace(self.tg, self.trace, path)

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.lib.mpk_destroy(self.handle)
            self.handle = None

    def __del__(self) -> None:
        self.close()


def _task_tables(tg: TaskGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tasks = np.zeros((tg.num_tasks, 3 + MAX_TILE), dtype=np.int32)
    tasks[:, 0] = tg.op
    tasks[:, 1] = tg.wait
    tasks[:, 2] = tg.signal
    for t, tile in enumerate(tg.tile):
        tasks[t, 3 : 3 + len(tile)] = tile
    events = np.zeros((tg.num_events, 3), dtype=np.int32)
    events[:, 0] = tg.num_triggers
    events[:, 1] = tg.first
    events[:, 2] = tg.last
    workers = np.asarray(tg.worker, dtype=np.int32)
    return tasks, events, workers


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise MpkError(f"cannot load the CPU backend library {path}: {exc}; delete that cache directory and retry") from None
    lib.mpk_create.restype = ctypes.c_void_p
    lib.mpk_create.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    lib.mpk_run.restype = ctypes.c_int32
    lib.mpk_run.argtypes = [ctypes.c_void_p]
    lib.mpk_stall_report.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mpk_trace.restype = ctypes.c_int32
    lib.mpk_trace.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    lib.mpk_destroy.argtypes = [ctypes.c_void_p]
    return lib
