"""Compile a model shape for a GPU, simulate one decode iteration under each execution
model, and report the predictions beside the HBM floor.

How context is modelled: an iteration processes ``batch`` rows at positions
``context .. context + batch - 1`` of one KV cache of ``context + batch`` slots, so row r
attends to ``context + r + 1`` slots. The decoder graph has one KV cache, so the rows of
a batch share it; a batch of independent sequences would read one cache each, which
makes the KV terms of these predictions a lower bound when batch > 1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from mpk.compiler.pipeline import compile_graph
from mpk.compiler.taskgraph import TaskGraph
from mpk.errors import ConfigError
from mpk.frontend.config import ModelConfig
from mpk.frontend.decoder import decoder_graph
from mpk.ir.graph import OpGraph
from mpk.ops import spec_of
from mpk.sim.costs import MemoryFloor, device_tensors, memory_floor, workload_from_taskgraph
from mpk.sim.models import ExecutionCosts, Prediction, predict_all
from mpk.sim.workload import Workload
from mpk.target import GpuSpec, Target, gpu_spec, gpu_target

log = logging.getLogger("mpk.sim")


@dataclass(frozen=True)
class Scenario:
    gpu: str                                  # a100, h100, h200 or b200
    batch: int = 1                            # rows per iteration
    context: int = 128                        # KV slots filled before the iteration
    sustained_fraction: float | None = None   # None: the GPU table's default


@dataclass(frozen=True)
class SimulationReport:
    model: str
    scenario: Scenario
    gpu: GpuSpec
    target: Target
    task_graph: TaskGraph
    workload: Workload
    floor: MemoryFloor
    predictions: list[Prediction]
    compile_seconds: float

    def prediction(self, model: str) -> Prediction:
        return next(p for p in self.predictions if p.model == model)


def scenario_target(scenario: Scenario) -> Target:
    target = gpu_target(scenario.gpu)
    if scenario.sustained_fraction is not None:
        target = dataclasses.replace(target, sustained_fraction=scenario.sustained_fraction)
    return target


def set_context(graph: OpGraph, context: int) -> None:
    """Give every operator that takes a ``context`` attribute (attention) this many filled
    KV slots, so that the compiler's static assignment balances the same costs that are
    simulated.
    """
    for op in graph.ops:
        if "context" in spec_of(op.kind).attributes:
            op.attrs["context"] = context


def check_scenario(cfg: ModelConfig, scenario: Scenario) -> None:
    if scenario.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {scenario.batch}")
    if scenario.context < 0:
        raise ConfigError(f"--context must be 0 or more filled KV slots, got {scenario.context}")
    if scenario.context + scenario.batch > cfg.max_positions:
        raise ConfigError(
            f"--context {scenario.context} plus --batch {scenario.batch} exceeds the model's "
            f"max_position_embeddings={cfg.max_positions}; use a shorter context"
        )


def simulate_config(cfg: ModelConfig, scenario: Scenario, costs: ExecutionCosts | None = None) -> SimulationReport:
    check_scenario(cfg, scenario)
    target = scenario_target(scenario)

    started = time.perf_counter()
    graph = decoder_graph(cfg, scenario.batch, scenario.context + scenario.batch, target)
    set_context(graph, scenario.context)
    tg = compile_graph(graph, target)
    compile_seconds = time.perf_counter() - started

    work = workload_from_taskgraph(tg)
    floor = memory_floor(tg, device_tensors(tg), scenario.context, target.memory_bandwidth)
    predictions = predict_all(work, costs or ExecutionCosts.for_target(target))
    log.info("simulated %s on %s: %d tasks, %d operators", graph.name, target.name, work.num_tasks, len(graph.ops))
    return SimulationReport(graph.name, scenario, gpu_spec(scenario.gpu), target, tg, work, floor, predictions, compile_seconds)


def format_report(report: SimulationReport) -> str:
    gpu, target, floor, scenario = report.gpu, report.target, report.floor, report.scenario
    lines = [
        f"{report.model} on {gpu.part}: {gpu.sms} SMs, {gpu.hbm_bandwidth / 1e12:.2f} TB/s HBM, "
        f"{gpu.l2_bytes / 2**20:.0f} MiB L2, {gpu.bf16_dense_flops / 1e12:.0f} TFLOPS dense BF16",
        f"batch {scenario.batch}, context {scenario.context} KV slots, sustained fraction {target.sustained_fraction:.2f}; "
        f"{report.workload.num_tasks} tasks in {len(report.task_graph.graph.ops)} operators (compiled in {report.compile_seconds:.2f} s)",
        f"HBM floor: {floor.weight_bytes / 1e6:.1f} MB weights + {floor.kv_bytes / 1e6:.1f} MB KV cache "
        f"at {floor.bandwidth / 1e12:.2f} TB/s = {floor.seconds * 1e3:.3f} ms",
        "",
        "PREDICTED by the simulator, not measured (one iteration gives each row one token):",
        f"{'execution model':22s} {'ms/token':>9s} {'tokens/s':>9s} {'GB/s':>7s} {'% of floor':>10s}",
    ]
    for p in report.predictions:
        lines.append(
            f"{p.model:22s} {p.seconds * 1e3:9.3f} {scenario.batch / p.seconds:9.1f} "
            f"{floor.total_bytes / p.seconds / 1e9:7.0f} {floor.seconds / p.seconds * 100:9.0f}%"
        )
    return "\n".join(lines)
