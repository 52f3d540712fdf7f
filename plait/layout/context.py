"""Context parallelism: each cp rank holds two load-balanced chunks of every sequence."""

from __future__ import annotations

from plait.layout.spec import Job


def sequence(job: Job) -> str | None:
    cp, seq_len = job.layout.cp, job.model.seq_len
    if cp > 1 and seq_len % (2 * cp):
        return (f"model.seq_len={seq_len} must be divisible by 2 x parallel.cp = {2 * cp} "
                "(each context-parallel rank holds two chunks)")
    return None
