"""The CUDA backend's host side: device checks, buffers, and one cooperative launch per iteration.

NOTE: no GPU has run this code yet; it compiles for sm_80, sm_90a and sm_100a, and its
device checks are tested with a mocked torch.cuda.
"""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import torch

from mpk.backends.cuda.build import ARCHITECTURES, build_megakernel
from mpk.backends.cuda.codegen import buffer_dtypes, generate_source
from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import MpkError, RuntimeStallError
from mpk.ir.tensor import TensorKind
from mpk.runtime.inputs import check_inputs, index_bounds
from mpk.runtime.trace import write_chrome_trace
from mpk.target import Target

log = logging.getLogger("mpk.backends.cuda")

THREADS = 256                 # MPK_THREADS: threads of one worker CTA
SMEM_BYTES = 96 * 1024        # MPK_SMEM_BYTES: dynamic shared memory of one worker CTA
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


class CudaDeviceError(MpkError):
    """No usable GPU, or one that cannot hold the task graph's workers."""


class _DeviceConfig(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("tasks", "events", "list_offsets", "lists", "counters", "buffers", "report", "stalled", "trace")]
    _fields_ += [("watchdog_ns", ctypes.c_uint64)]


def check_device(workers: int, smem_bytes: int = SMEM_BYTES, device: int = 0) -> tuple[str, object]:
    """Return (architecture, device properties) if the GPU can run ``workers`` worker CTAs."""
    if not torch.cuda.is_available():
        raise CudaDeviceError("no CUDA device is visible (torch.cuda.is_available() is False); "
                              "use --backend cpu, or check the NVIDIA driver and CUDA_VISIBLE_DEVICES")
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    if capability not in ARCHITECTURES:
        supported = ", ".join(f"{a}.{b}" for a, b in sorted(ARCHITECTURES))
        raise CudaDeviceError(f"{props.name} has compute capability {props.major}.{props.minor}, which mpk does not support; "
                              f"supported: {supported}")
    if props.multi_processor_count < workers:
        raise CudaDeviceError(f"the task graph has {workers} workers but {props.name} has {props.multi_processor_count} SMs; "
                              f"compile with --workers {props.multi_processor_count} or fewer")
    available = getattr(props, "shared_memory_per_block_optin", 0)
    if available < smem_bytes:
        raise CudaDeviceError(f"a worker needs {smem_bytes} bytes of shared memory but {props.name} allows {available} per block")
    return ARCHITECTURES[capability], props


def cuda_target(device: int = 0) -> Target:
    """A target for the visible GPU: a known part's figures, or its SM count with H100's rates."""
    from mpk.target import gpu_target

    props = torch.cuda.get_device_properties(device)
    for key in ("b200", "h200", "h100", "a100"):
        if key in props.name.lower():
            base = gpu_target(key)
            break
    else:
        base = gpu_target("h100")
    return Target(**{**base.to_dict(), "name": props.name, "workers": props.multi_processor_count})


# The host busy-polls this long, so that a short iteration's end waits on no sleep (the
# simulator predicts about a millisecond per decode step). Then it polls every millisecond.
SPIN_SECONDS = 0.05


def wait_for_stream(stream, timeout_seconds: float, clock=time.monotonic, sleep=time.sleep) -> None:
    """Wait until ``stream`` has finished its work, or raise RuntimeStallError after
    ``timeout_seconds``. The device watchdog stops workers that wait on an event too long.
    This bound catches what it cannot see, a task that never returns, so that the host
    reports it instead of blocking forever in a synchronize.
    """
    start = clock()
    while not stream.query():
        elapsed = clock() - start
        if elapsed > timeout_seconds:
            raise RuntimeStallError(
                f"the megakernel has not finished after {elapsed:.0f} s, although its device watchdog stops any wait on "
                f"an event long before that: a task itself is stuck. The GPU is still running it; exit this process to "
                f"free the device, and report the model and the command")
        if elapsed > SPIN_SECONDS:
            sleep(0.001)


class CudaExecutor:
    def __init__(self, tg: TaskGraph, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *,
                 trace: bool = False, watchdog_seconds: float = 10.0) -> None:
        arch, props = check_device(tg.target.workers)
        self.tg = tg
        self.library = ctypes.CDLL(str(build_megakernel(generate_source(tg), arch)))
        self.library.mpk_cuda_launch.restype = ctypes.c_int32
        self.library.mpk_cuda_launch.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_void_p]
        self.library.mpk_cuda_occupancy.restype = ctypes.c_int32
        self.library.mpk_cuda_occupancy.argtypes = [ctypes.c_int32, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32)]
        self.library.mpk_cuda_error_string.restype = ctypes.c_char_p
        self._check_residency(props)
        self.buffers = self._allocate(weights, state)
        self._device_tables(trace, watchdog_seconds)
        self.iteration = 0
        self.trace: list[tuple[int, int, int, int]] = []
        self.outputs = {s.name: self.buffers[s.name] for s in tg.placement.buffers.values() if s.kind is TensorKind.OUTPUT}
        self.bounds = index_bounds(tg)
        self.watchdog_seconds = watchdog_seconds

    def _check_residency(self, props) -> None:
        per_sm = ctypes.c_int32(0)
        status = self.library.mpk_cuda_occupancy(THREADS, SMEM_BYTES, ctypes.byref(per_sm))
        if status != 0:
            raise CudaDeviceError(f"occupancy query failed: {self.library.mpk_cuda_error_string(status).decode()}")
        if per_sm.value * props.multi_processor_count < self.tg.target.workers:
            raise CudaDeviceError(f"only {per_sm.value} worker CTAs fit per SM ({THREADS} threads, {SMEM_BYTES} bytes of shared memory), "
                                  f"so {self.tg.target.workers} workers cannot all be resident on {props.multi_processor_count} SMs")

    def _allocate(self, weights, state) -> dict[str, torch.Tensor]:
        dtypes = buffer_dtypes(self.tg)
        buffers = {}
        for name, spec in self.tg.placement.buffers.items():
            dtype = TORCH_DTYPES[dtypes[name]]
            if spec.kind is TensorKind.WEIGHT:
                buffers[name] = weights[name].to(device="cuda", dtype=dtype).contiguous()
            elif spec.kind is TensorKind.STATE:
                buffers[name] = state.setdefault(name, torch.zeros(spec.shape, dtype=dtype, device="cuda"))
            else:
                buffers[name] = torch.empty(spec.shape, dtype=dtype, device="cuda")
        return buffers

    def _device_tables(self, trace: bool, watchdog_seconds: float) -> None:
        from mpk.backends.cpu.executor import _task_tables

        tasks, events, workers = _task_tables(self.tg)
        order = np.argsort(workers, kind="stable").astype(np.int32)  # each worker's tasks, in global order
        offsets = np.searchsorted(workers[order], np.arange(self.tg.target.workers + 1)).astype(np.int32)
        device = lambda array: torch.from_numpy(np.ascontiguousarray(array)).cuda()  # noqa: E731
        self._tables = {
            "tasks": device(tasks), "events": device(events), "list_offsets": device(offsets), "lists": device(order),
            "counters": torch.zeros(self.tg.num_events, dtype=torch.int64, device="cuda"),
            "report": torch.zeros(8, dtype=torch.int64, device="cuda"),
            "stalled": torch.zeros(1, dtype=torch.int32, device="cuda"),
            "trace": torch.zeros(2 * self.tg.num_tasks, dtype=torch.int64, device="cuda") if trace else None,
        }
        pointers = [b.data_ptr() for b in self.buffers.values()]
        self._pointer_table = torch.tensor(pointers, dtype=torch.int64, device="cuda")
        t = self._tables
        self._config = _DeviceConfig(
            t["tasks"].data_ptr(), t["events"].data_ptr(), t["list_offsets"].data_ptr(), t["lists"].data_ptr(),
            t["counters"].data_ptr(), self._pointer_table.data_ptr(), t["report"].data_ptr(), t["stalled"].data_ptr(),
            t["trace"].data_ptr() if trace else None, int(watchdog_seconds * 1e9),
        )

    def write_trace(self, path):
        """Write the last iteration's per-task timeline (from %globaltimer) as a Chrome/Perfetto trace."""
        if not self.trace:
            raise MpkError("no trace recorded: create the executor with trace=True and run an iteration")
        return write_chrome_trace(self.tg, self.trace, path)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in check_inputs(self.tg, inputs, self.bounds).items():
            self.buffers[name].copy_(value, non_blocking=True)
        self.iteration += 1
        stream = torch.cuda.current_stream().cuda_stream
        status = self.library.mpk_cuda_launch(ctypes.byref(self._config), self.tg.target.workers, THREADS, SMEM_BYTES,
                                              self.iteration, ctypes.c_void_p(stream))
        if status != 0:
            raise MpkError(f"the megakernel launch failed: {self.library.mpk_cuda_error_string(status).decode()}")
        wait_for_stream(torch.cuda.current_stream(), 3 * self.watchdog_seconds)
        if self._tables["trace"] is not None:
            times = self._tables["trace"].view(-1, 2).cpu().tolist()
            self.trace = [(t, self.tg.worker[t], begin, end) for t, (begin, end) in enumerate(times)]
        if int(self._tables["stalled"].item()):
            report = self._tables["report"].cpu().view(torch.int32)[:4].tolist()
            raise RuntimeStallError(f"watchdog: worker {report[0]} timed out waiting on event {report[2]} for "
                                    f"{self.tg.task_label(report[1])}; the megakernel stopped")
        return self.outputs
