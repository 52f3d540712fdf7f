"""Rules every layout obeys: degrees, names, the world size and the global batch."""

from __future__ import annotations

from plait.layout.batch import batch_problem
from plait.layout.pipeline import SCHEDULE_ALIASES, SCHEDULES
from plait.layout.spec import RECOMPUTE, Job

# The config field each Layout field is set by, for messages that name what the user wrote.
FIELD = {
    "tp": "parallel.tp", "pp": "parallel.pp", "dp": "parallel.dp", "cp": "parallel.cp", "ep": "parallel.ep",
    "etp": "parallel.etp", "zero": "parallel.zero", "micro_batch": "train.micro_batch",
    "virtual_stages": "parallel.pp_virtual_stages", "schedule": "parallel.pp_schedule",
    "recompute": "train.recompute", "sequence_parallel": "parallel.sequence_parallel",
}


def degrees(job: Job) -> str | None:
    for key in ("tp", "pp", "dp", "cp", "ep", "etp", "micro_batch", "virtual_stages"):
        value = getattr(job.layout, key)
        if value < 1:
            return f"{FIELD[key]}={value} must be at least 1"
    return None


def names(job: Job) -> str | None:
    layout = job.layout
    if layout.schedule not in SCHEDULES and layout.schedule not in SCHEDULE_ALIASES:
        return f"parallel.pp_schedule={layout.schedule!r} is not one of {', '.join(SCHEDULES)}"
    if layout.recompute not in RECOMPUTE:
        return f"train.recompute={layout.recompute!r} is not one of {', '.join(RECOMPUTE)}"
    return None


def zero_stage(job: Job) -> str | None:
    if job.layout.zero not in (0, 1, 2, 3):
        return f"parallel.zero={job.layout.zero} must be 0, 1, 2 or 3"
    return None


def world_size(job: Job) -> str | None:
    p = job.layout
    if p.world_size != job.world_size:
        return (f"parallel.dp={p.dp} x tp={p.tp} x cp={p.cp} x pp={p.pp} = {p.world_size} "
                f"!= world size {job.world_size}")
    return None


def global_batch(job: Job) -> str | None:
    """Any dp serves any global batch, shared out unevenly if need be (batch.py), as long as
    no rank is left with an empty micro-batch."""
    return batch_problem(job.global_batch, job.layout.micro_batch, job.layout.dp)
