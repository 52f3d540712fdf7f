"""How each rank computes its step: torch.compile and the chunked LM-head loss."""

from __future__ import annotations

from plait.layout.spec import Job


def compile_layouts(job: Job) -> str | None:
    p = job.layout
    if job.features.compile and (p.tp > 1 or p.cp > 1 or p.pp > 1):
        return "train.compile=true with parallel.tp, cp or pp > 1 is not yet supported"
    return None


def compile_zero3(job: Job) -> str | None:
    if job.features.compile and job.layout.zero == 3:
        return "train.compile=true with parallel.zero=3 is not yet supported"
    return None


def chunked_loss(job: Job) -> str | None:
    p = job.layout
    if job.features.chunked_ce == "on" and (p.tp > 1 or p.pp > 1 or p.zero == 3):
        return ("train.chunked_ce=on needs parallel.tp=1, pp=1 and zero<3 "
                "(tensor parallelism has its own vocab-parallel loss)")
    return None
