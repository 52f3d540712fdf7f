"""The registry: every strategy's rules, in the order their messages are reported."""

from __future__ import annotations

from typing import Callable

from plait.layout import compute, context, expert, lowcomm, pipeline, tensor, world
from plait.layout.spec import Job

Rule = Callable[[Job], "str | None"]

# A job that breaks several rules is told about the first one.
# The world size and the batch come first: config validation derives dp and micro_batch from them
# before anything else, so both sides name the same first problem.
RULES: tuple[Rule, ...] = (
    world.degrees, world.names, world.world_size, world.global_batch,
    expert.needs_experts,
    context.sequence,
    tensor.split,
    compute.compile_layouts, world.zero_stage, compute.compile_zero3, compute.chunked_loss,
    pipeline.schedule, pipeline.layer_split,
    lowcomm.galore, lowcomm.local_sync, lowcomm.compression,
    expert.folding, expert.not_yet_combined,
)


def check_job(job: Job) -> str | None:
    """The first reason this job cannot run, or None when every rule accepts it."""
    for rule in RULES:
        reason = rule(job)
        if reason is not None:
            return reason
    return None
