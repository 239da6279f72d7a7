"""The simulator's input: tasks in global order, their durations and the events between them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpk.errors import SimulationError

BEGIN = 0      # the event the host signals before the iteration starts
RELAY = -1     # kernel index of a relay task, which only forwards an event


@dataclass(frozen=True)
class Workload:
    """Tasks in global order with the per-task durations of one machine.

    Task t waits on event ``wait[t]`` and signals ``signal[t]``. Event e fires when
    ``num_triggers[e]`` tasks have signaled it, and event 0 (BEGIN) has fired when the
    iteration starts. ``worker`` is the static assignment. ``kernel`` is the operator of
    each task (RELAY for a relay), so that kernel-per-operator execution launches one
    kernel per operator, in increasing operator order.
    """

    seconds: list[float]
    wait: list[int]
    signal: list[int]
    worker: list[int]
    kernel: list[int]
    num_triggers: list[int]
    workers: int
    labels: list[str] = field(default_factory=list)   # trace names per task; empty for "task N"
    # Seconds of each task's loads that depend on no event (weights). A static worker may
    # issue them while it waits for the task's event. Empty for none.
    prefetch: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_columns()
        self._check_events()

    @property
    def num_tasks(self) -> int:
        return len(self.seconds)

    @property
    def num_events(self) -> int:
        return len(self.num_triggers)

    def prefetch_seconds(self, task: int) -> float:
        return self.prefetch[task] if self.prefetch else 0.0

    def label(self, task: int) -> str:
        return self.labels[task] if self.labels else f"task {task}"

    def consumers(self) -> list[list[int]]:
        """Return the tasks that wait on each event, in global order."""
        found: list[list[int]] = [[] for _ in range(self.num_events)]
        for task, event in enumerate(self.wait):
            found[event].append(task)
        return found

    def _check_columns(self) -> None:
        n = self.num_tasks
        for name in ("wait", "signal", "worker", "kernel"):
            if len(getattr(self, name)) != n:
                raise SimulationError(f"workload column {name!r} has {len(getattr(self, name))} entries for {n} tasks; give one per task")
        if self.labels and len(self.labels) != n:
            raise SimulationError(f"workload has {len(self.labels)} labels for {n} tasks; give one per task or none")
        if self.prefetch and len(self.prefetch) != n:
            raise SimulationError(f"workload has {len(self.prefetch)} prefetch times for {n} tasks; give one per task or none")
        if self.workers < 1:
            raise SimulationError(f"workload has workers={self.workers}; use at least 1")
        for task in range(n):
            if not 0 <= self.worker[task] < self.workers:
                raise SimulationError(f"{self.label(task)} is assigned to worker {self.worker[task]}; use 0 to {self.workers - 1}")
            if self.seconds[task] < 0:
                raise SimulationError(f"{self.label(task)} has a negative duration {self.seconds[task]}")
            if not 0 <= self.prefetch_seconds(task) <= self.seconds[task]:
                raise SimulationError(
                    f"{self.label(task)} prefetches for {self.prefetch_seconds(task)} s of its {self.seconds[task]} s; "
                    "use 0 up to the task's duration"
                )

    def _check_events(self) -> None:
        """Reject events that can never fire: a task waiting on one would stall every model."""
        for task in range(self.num_tasks):
            for event in (self.wait[task], self.signal[task]):
                if not 0 <= event < self.num_events:
                    raise SimulationError(f"{self.label(task)} names event {event}; events are 0 to {self.num_events - 1}")
            if self.signal[task] == BEGIN:
                raise SimulationError(f"{self.label(task)} signals BEGIN (event 0), which only the host signals")
        signalers = [0] * self.num_events
        for event in self.signal:
            signalers[event] += 1
        for event in range(1, self.num_events):
            if signalers[event] != self.num_triggers[event]:
                raise SimulationError(
                    f"event {event} needs {self.num_triggers[event]} triggers but {signalers[event]} tasks signal it; "
                    "num_triggers must count the tasks that signal each event"
                )
        for task, event in enumerate(self.wait):
            if event != BEGIN and self.num_triggers[event] == 0:
                raise SimulationError(f"{self.label(task)} waits on event {event}, which no task signals, so it never runs")
