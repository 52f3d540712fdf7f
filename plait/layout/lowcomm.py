"""Less communication: GaLore, gradient compression and local SGD need whole weights or
whole gradients, which some layouts do not give them."""

from __future__ import annotations

from plait.layout.spec import Job


def galore(job: Job) -> str | None:
    p = job.layout
    if job.features.optimizer == "galore" and (p.zero != 0 or p.tp != 1):
        return "optim.name=galore needs whole matrices: parallel.zero=0 and parallel.tp=1"
    return None


def local_sync(job: Job) -> str | None:
    f = job.features
    if f.sync == "every_step":
        return None
    if job.layout.zero == 3:
        return f"train.sync={f.sync} with parallel.zero=3 is not supported (workers keep whole weights)"
    if job.global_batch % job.layout.dp:
        # Each worker normalises its loss by an equal share of the batch's tokens
        # (lowcomm.loss_workers), so its inner steps are the mean over its own rows only then.
        return (f"train.sync={f.sync} needs train.global_batch={job.global_batch} divisible by "
                f"dp={job.layout.dp} (each worker trains on an equal share of the batch)")
    if f.grad_compression != "none":
        return f"parallel.grad_compression={f.grad_compression} only applies to train.sync=every_step"
    return None


def compression(job: Job) -> str | None:
    f = job.features
    if f.grad_compression != "none" and job.layout.zero != 0:
        return (f"parallel.grad_compression={f.grad_compression} needs parallel.zero=0 "
                "(it replaces the all-reduce of whole gradients)")
    return None
