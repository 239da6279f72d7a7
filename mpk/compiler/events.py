"""Events: the counters that order tasks, one wait and one signal per task.

Starting from the exact task dependencies, the pass

1. drops transitive edges (p is redundant for c if it is an ancestor of another producer of c);
2. fuses consumers that need exactly the same producers into one event;
3. normalizes, so that every task signals one event: events sharing a producer are merged
   when the merged event still has all producers before all consumers in program order
   (this coarsens: a consumer may now wait for more than it needs), and otherwise the
   shared producers signal a fresh event that relay tasks forward to each event that
   needs them.

Ancestor sets are Python ints used as bitsets indexed by task.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

BEGIN = 0  # fired by the host once the iteration's inputs are written


@dataclass
class EventPlan:
    """Events before linearization. Task ids at or above ``num_tasks`` are relays."""

    num_tasks: int
    wait: list[int]
    signal: list[int]
    triggers: list[list[int]]
    consumers: list[list[int]]
    end: int
    relay_groups: list[list[int]] = field(default_factory=list)  # per relay: the producers it forwards
    stats: dict = field(default_factory=dict)


@dataclass
class _Event:
    triggers: set[int]
    consumers: set[int]
    alive: bool = True


def ancestor_sets(deps: list[set[int]]) -> list[int]:
    anc: list[int] = []
    for producers in deps:
        bits = 0
        for p in producers:
            bits |= anc[p] | (1 << p)
        anc.append(bits)
    return anc


def reduce_producers(producers: set[int], anc: list[int]) -> set[int]:
    """Keep the producers that are not ancestors of another producer in the set."""
    implied = 0
    for q in producers:
        implied |= anc[q]
    return {p for p in producers if not (implied >> p) & 1}


def build_events(deps: list[set[int]], op_of_task: list[int]) -> EventPlan:
    """``op_of_task`` gives each task's operator: merges stay within one operator's consumers,
    because a merge across operators can chain tasks of one operator behind each other.
    """
    num_tasks = len(deps)
    anc = ancestor_sets(deps)
    reduced = [reduce_producers(d, anc) for d in deps]

    events = [_Event(set(), set())]  # BEGIN
    by_producers: dict[frozenset[int], int] = {}
    for task, producers in enumerate(reduced):
        if not producers:
            events[BEGIN].consumers.add(task)
            continue
        key = frozenset(producers)
        if key not in by_producers:
            by_producers[key] = len(events)
            events.append(_Event(set(producers), set()))
        events[by_producers[key]].consumers.add(task)
    fused = len(events) - 1

    member: dict[int, set[int]] = {}
    for e, event in enumerate(events):
        for p in event.triggers:
            member.setdefault(p, set()).add(e)
    merges = _merge_shared(events, member, anc, op_of_task)
    relay_groups = _add_relays(events, member, num_tasks)

    return _finish(events, num_tasks, relay_groups, anc, {
        "exact_edges": sum(len(d) for d in deps),
        "reduced_edges": sum(len(r) for r in reduced),
        "fused_events": fused,
        "merged_events": merges,
        "relay_tasks": len(relay_groups),
    })


def _merge_shared(events: list[_Event], member: dict[int, set[int]], anc: list[int], op_of_task: list[int]) -> int:
    """Make producers signal one event each where that needs no relay; return the merge count.

    Two fixes are tried, in program order of the producers. Merging two events is taken
    when it is safe and their consumers belong to one operator. Otherwise the event that fires later stops waiting on the shared
    producer p and waits instead on the consumers of the earliest event p triggers:
    they run after p, and if they all come before its own consumers nothing can deadlock.
    """
    merges = 0
    queue = sorted(member)
    heapq.heapify(queue)
    queued = set(queue)
    while queue:
        p = heapq.heappop(queue)
        queued.discard(p)
        while len(member[p]) > 1:
            pair = _safe_pair(events, sorted(member[p]), anc, op_of_task)
            if pair is not None:
                _merge(events, member, anc, *pair)
                merges += 1
                continue
            added = _push_forward(events, member, anc, p)
            if not added:
                break
            for task in added - queued:
                heapq.heappush(queue, task)
                queued.add(task)
    return merges


def _merge(events: list[_Event], member: dict[int, set[int]], anc: list[int], keep: int, absorbed: int) -> None:
    old = events[keep].triggers | events[absorbed].triggers
    triggers = reduce_producers(old, anc)
    _retrigger(member, old, triggers, (keep, absorbed), keep)
    events[keep].triggers = triggers
    events[keep].consumers |= events[absorbed].consumers
    events[absorbed].alive = False


def _push_forward(events: list[_Event], member: dict[int, set[int]], anc: list[int], p: int) -> set[int]:
    """Replace p in later events by the consumers of its earliest event; return the tasks
    that became triggers (empty when no event could be changed).
    """
    ids = sorted(member[p], key=lambda e: min(events[e].consumers))
    successors = events[ids[0]].consumers
    added: set[int] = set()
    for e in ids[1:]:
        if max(successors) >= min(events[e].consumers):
            continue
        old = set(events[e].triggers)
        triggers = reduce_producers((old - {p}) | successors, anc)
        _retrigger(member, old, triggers, (e,), e)
        events[e].triggers = triggers
        added |= triggers - old
    return added


def _retrigger(member: dict[int, set[int]], old: set[int], new: set[int], dropped: tuple[int, ...], event: int) -> None:
    for q in old:
        member[q] -= set(dropped)
    for q in new:
        member.setdefault(q, set()).add(event)


def _safe_pair(events: list[_Event], ids: list[int], anc: list[int], op_of_task: list[int]) -> tuple[int, int] | None:
    """Find two events of one operator's consumers whose merge keeps every trigger before
    every consumer.
    """
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if len({op_of_task[c] for c in events[a].consumers | events[b].consumers}) > 1:
                continue
            triggers = reduce_producers(events[a].triggers | events[b].triggers, anc)
            if max(triggers) < min(events[a].consumers | events[b].consumers):
                return a, b
    return None


def _add_relays(events: list[_Event], member: dict[int, set[int]], num_tasks: int) -> list[list[int]]:
    """Give producers that several events still share one fan-out event; a relay task per
    event waits on it and signals that event in their place. Producers with the same set of
    events share the fan-out, so no consumer waits for more than before.
    """
    shared: dict[frozenset[int], list[int]] = {}
    for p in sorted(member):
        if len(member[p]) > 1:
            shared.setdefault(frozenset(member[p]), []).append(p)
    relay_groups: list[list[int]] = []
    for targets, producers in shared.items():
        fan_out = _Event(set(producers), set())
        events.append(fan_out)
        for e in sorted(targets):
            relay = num_tasks + len(relay_groups)
            relay_groups.append(producers)
            fan_out.consumers.add(relay)
            events[e].triggers -= set(producers)
            events[e].triggers.add(relay)
    return relay_groups


def _finish(events: list[_Event], num_tasks: int, relay_groups: list[list[int]], anc: list[int], stats: dict) -> EventPlan:
    total = num_tasks + len(relay_groups)
    live = [e for e in events if e.alive]
    wait = [BEGIN] * total
    signal = [-1] * total
    for e, event in enumerate(live):
        for c in event.consumers:
            wait[c] = e
        for p in event.triggers:
            signal[p] = e
    end = len(live)
    leaves = [t for t in range(total) if signal[t] < 0]
    for t in leaves:
        signal[t] = end
    triggers = [sorted(e.triggers) for e in live] + [leaves]
    consumers = [sorted(e.consumers) for e in live] + [[]]
    # A consumer is coarsened when its event waits for a task it does not depend on.
    def producers_behind(trigger: int) -> list[int]:
        return relay_groups[trigger - num_tasks] if trigger >= num_tasks else [trigger]

    waited = [{p for t in ts for p in producers_behind(t)} for ts in triggers]
    stats["coarsened_consumers"] = sum(
        1 for c in range(num_tasks) if any(not (anc[c] >> p) & 1 for p in waited[wait[c]])
    )
    stats["events"] = end + 1
    return EventPlan(num_tasks, wait, signal, triggers, consumers, end, relay_groups, stats)
