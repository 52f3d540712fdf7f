"""Check and time a pipeline schedule without processes.

The machine model: each rank runs its op list strictly in order, one op at a time; an op starts
as soon as the rank is free and every op it depends on has finished (on any rank). Messages
arrive the instant their producer finishes, so the simulated bubbles are the schedule's own,
not the network's. Dependencies, with s a virtual stage and S = pp * v stages:

    F(mb, s)  needs F(mb, s - 1)                   (its input activation)
    B(mb, s)  needs F(mb, s) and B(mb, s + 1)      (its activation and the output gradient)
    W(mb, s)  needs B(mb, s)                       (the saved output gradient)

Cost convention (what makes the textbook bubble formulas exact): `cost` gives the time of a
*whole rank's* share of one micro-batch: F for the forward, B for the full backward (input and
weight gradient), W for the weight-gradient part. With v chunks per rank every op of a chunk
costs 1/v of that, so a rank does the same work per micro-batch whatever the interleaving. When
a schedule splits the backward (it has W ops), its B op costs B - W, so B + W is still the full
backward. Defaults F=1, B=2, W=1 (backward twice the forward, split evenly, as in Qi et al.).
With these, idle fractions are exactly (p-1)/(m+p-1) for GPipe and 1F1B and (p-1)/(v m+p-1)
for interleaved 1F1B, and ZB-H1's idle time is a third of 1F1B's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.parallel.schedules import Op

DEFAULT_COST: dict[str, float] = {"F": 1.0, "B": 2.0, "W": 1.0}

Key = tuple[str, int, int]  # (kind, micro-batch, virtual stage)


class ScheduleError(ValueError):
    """A schedule that would compute the wrong thing or hang: missing/extra ops, bad order."""


@dataclass(frozen=True)
class Span:
    op: Op
    start: float
    end: float


@dataclass
class SimResult:
    timelines: list[list[Span]]  # per rank, in execution order
    makespan: float  # from t = 0 (first op anywhere) to the end of the last op anywhere
    busy: list[float]  # per rank, total op time
    idle_fraction: list[float]  # per rank, 1 - busy / makespan
    peak_in_flight: list[int]  # per rank, most (micro-batch, chunk) activations held at once
    mean_idle_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean_idle_fraction = sum(self.idle_fraction) / len(self.idle_fraction)

    @property
    def idle_time(self) -> list[float]:
        return [self.makespan - b for b in self.busy]


def _shape(schedules: list[list[Op]]) -> tuple[int, int, int, bool]:
    """(pp, micro-batches, chunks per rank, whether backward is split), read off the ops."""
    pp = len(schedules)
    ops = [op for rank_ops in schedules for op in rank_ops]
    if pp == 0 or not ops:
        raise ScheduleError("empty schedule")
    microbatches = max(op.microbatch for op in ops) + 1
    chunks = max(op.chunk for op in ops) + 1
    return pp, microbatches, chunks, any(op.kind == "W" for op in ops)


def _check_complete(schedules: list[list[Op]], pp: int, m: int, v: int, split: bool) -> None:
    """Every rank runs each of its passes exactly once, and only its own."""
    kinds = ("F", "B", "W") if split else ("F", "B")
    for rank, rank_ops in enumerate(schedules):
        expected = {Op(k, mb, rank, c) for k in kinds for mb in range(m) for c in range(v)}
        seen: set[Op] = set()
        for op in rank_ops:
            if op.rank != rank:
                raise ScheduleError(f"rank {rank}'s list holds {op}, an op of rank {op.rank}")
            if op in seen:
                raise ScheduleError(f"rank {rank} runs {op} twice")
            seen.add(op)
        if seen != expected:
            missing = sorted(map(str, expected - seen))[:3]
            extra = sorted(map(str, seen - expected))[:3]
            raise ScheduleError(f"rank {rank}: missing {missing}, unexpected {extra}")


def _dependencies(op: Op, pp: int, stages: int) -> list[Key]:
    s = op.virtual_stage(pp)
    if op.kind == "F":
        return [("F", op.microbatch, s - 1)] if s > 0 else []
    if op.kind == "B":
        deps: list[Key] = [("F", op.microbatch, s)]
        if s < stages - 1:
            deps.append(("B", op.microbatch, s + 1))
        return deps
    return [("B", op.microbatch, s)]


def _op_cost(op: Op, cost: dict[str, float], v: int, split: bool) -> float:
    if op.kind == "B" and split:
        return (cost["B"] - cost["W"]) / v
    return cost[op.kind] / v


def _run(schedules: list[list[Op]], cost: dict[str, float]) -> list[list[Span]]:
    """Execute in order, earliest start for every op; raise ScheduleError on a deadlock."""
    pp, m, v, split = _shape(schedules)
    _check_complete(schedules, pp, m, v, split)
    stages = pp * v
    finished: dict[Key, float] = {}
    timelines: list[list[Span]] = [[] for _ in range(pp)]
    position = [0] * pp
    remaining = sum(len(ops) for ops in schedules)
    while remaining:
        progressed = False
        for rank in range(pp):
            # Run this rank as far as it can go before looking at the others.
            while position[rank] < len(schedules[rank]):
                op = schedules[rank][position[rank]]
                deps = _dependencies(op, pp, stages)
                if any(d not in finished for d in deps):
                    break
                free_at = timelines[rank][-1].end if timelines[rank] else 0.0
                start = max([free_at] + [finished[d] for d in deps])
                end = start + _op_cost(op, cost, v, split)
                timelines[rank].append(Span(op, start, end))
                finished[(op.kind, op.microbatch, op.virtual_stage(pp))] = end
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"rank {r} at {schedules[r][position[r]]}"
                              for r in range(pp) if position[r] < len(schedules[r]))
            raise ScheduleError(f"deadlock: every unfinished rank waits on an op that cannot run ({stuck})")
    return timelines


def validate_order(schedules: list[list[Op]]) -> None:
    """Raise ScheduleError unless the schedule runs every pass once and in a dependency-respecting order."""
    _run(schedules, DEFAULT_COST)


def peak_in_flight(rank_ops: list[Op]) -> int:
    """Most (micro-batch, chunk) activations a rank holds at once.

    An activation is held from the start of its forward until its backward has consumed it;
    when backward is split, W still needs the layer inputs, so it is held until W is done.
    """
    split = any(op.kind == "W" for op in rank_ops)
    release = "W" if split else "B"
    held = peak = 0
    for op in rank_ops:
        if op.kind == "F":
            held += 1
            peak = max(peak, held)
        elif op.kind == release:
            held -= 1
    return peak


def simulate(schedules: list[list[Op]], cost: dict[str, float] | None = None) -> SimResult:
    """Time the schedule under the module's machine model and cost convention."""
    cost = {**DEFAULT_COST, **(cost or {})}
    timelines = _run(schedules, cost)
    makespan = max(t[-1].end for t in timelines if t)
    busy = [sum(span.end - span.start for span in t) for t in timelines]
    idle = [1.0 - b / makespan for b in busy]
    peaks = [peak_in_flight(ops) for ops in schedules]
    return SimResult(timelines, makespan, busy, idle, peaks)
