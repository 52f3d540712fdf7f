"""Pipeline parallelism: schedules, virtual stages and how layers are split over stages."""

from __future__ import annotations

from plait.layout.spec import Job

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")
# Other spellings accepted for the same schedule: the planner used to call zero-bubble H1 "zb-h1".
SCHEDULE_ALIASES = {"zb-h1": "zb"}


def canonical_schedule(name: str) -> str:
    return SCHEDULE_ALIASES.get(name, name)


def schedule_problem(pp: int, microbatches: int, virtual_stages: int, n_layers: int, schedule: str) -> str | None:
    """The one-line reason this pipeline cannot run, or None when it can.

    Checked while validating the config, so that an impossible schedule is a config error
    before any process starts, never a hang halfway through a step.
    """
    schedule = canonical_schedule(schedule)
    if schedule not in SCHEDULES:
        return f"parallel.pp_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}"
    if pp < 1:
        return f"parallel.pp={pp} must be at least 1"
    if microbatches < 1:
        return f"parallel.pp_microbatches={microbatches} must be at least 1"
    if virtual_stages < 1:
        return f"parallel.pp_virtual_stages={virtual_stages} must be at least 1"
    if schedule == "interleaved":
        if pp < 2:
            return "parallel.pp_schedule='interleaved' needs parallel.pp >= 2"
        if virtual_stages < 2:
            return ("parallel.pp_schedule='interleaved' needs parallel.pp_virtual_stages >= 2 "
                    "(with 1 it is parallel.pp_schedule='1f1b')")
        # The interleaved order walks micro-batches in groups of pp, one group per chunk in
        # turn; a partial group would leave a rank waiting for a forward that never comes.
        if microbatches % pp != 0:
            return (f"parallel.pp_schedule='interleaved' needs parallel.pp_microbatches "
                    f"({microbatches}) to be a multiple of parallel.pp ({pp})")
    elif virtual_stages != 1:
        return (f"parallel.pp_virtual_stages={virtual_stages} needs parallel.pp_schedule='interleaved' "
                f"(got {schedule!r})")
    stages = pp * virtual_stages
    if n_layers < stages:
        return (f"model.n_layers={n_layers} is fewer than the {stages} pipeline stages "
                f"(parallel.pp={pp} x parallel.pp_virtual_stages={virtual_stages}); "
                f"each stage needs at least one layer")
    return None


def split_problem(counts: list[int] | tuple[int, ...], n_layers: int, stages: int) -> str | None:
    """Why `counts` (parallel.pp_layers) is not a usable split of n_layers over `stages` stages."""
    if len(counts) != stages:
        return (f"parallel.pp_layers has {len(counts)} entries but there are {stages} pipeline "
                f"stages (parallel.pp x parallel.pp_virtual_stages); give one layer count per stage")
    if any(c < 1 for c in counts):
        return f"parallel.pp_layers={list(counts)}: every stage needs at least one layer"
    if sum(counts) != n_layers:
        return f"parallel.pp_layers={list(counts)} sums to {sum(counts)}, not model.n_layers={n_layers}"
    return None


# With pp = 1 there is no pipeline: its schedule and split settings are not used, so not checked.
# Every ZeRO stage runs under every schedule (ZeRO-3 gathers per pass: parallel/zero3.py).

def schedule(job: Job) -> str | None:
    p = job.layout
    if p.pp == 1:
        return None
    return schedule_problem(p.pp, job.micro_batches, p.virtual_stages, job.model.n_layers, p.schedule)


def layer_split(job: Job) -> str | None:
    p = job.layout
    if p.pp == 1 or not p.pp_layers:
        return None
    return split_problem(p.pp_layers, job.model.n_layers, p.pp * p.virtual_stages)
