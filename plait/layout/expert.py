"""Expert parallelism, folded into the tp x cp x dp ranks of a pipeline stage (it does not
multiply them), and what mixture-of-experts models cannot be combined with yet."""

from __future__ import annotations

from plait.layout.spec import Job


def needs_experts(job: Job) -> str | None:
    p = job.layout
    if job.model.n_experts == 0 and (p.ep != 1 or p.etp != 1):
        return f"parallel.ep={p.ep} / etp={p.etp} need an MoE model (model.n_experts > 0)"
    return None


def folding(job: Job) -> str | None:
    m, p = job.model, job.layout
    if m.n_experts == 0:
        return None
    if p.etp != 1:
        return f"parallel.etp={p.etp} is not yet supported (experts are not tensor-parallel; use 1)"
    folded = p.tp * p.cp * p.dp
    if folded % (p.ep * p.etp):
        return (f"parallel.ep={p.ep} x etp={p.etp} must divide tp x cp x dp = {folded} "
                "(expert parallelism is folded into those ranks)")
    if m.n_experts % p.ep:
        return f"model.n_experts={m.n_experts} is not divisible by parallel.ep={p.ep}"
    if p.tp > 1 and not p.sequence_parallel:
        return ("model.n_experts > 0 with parallel.tp > 1 needs parallel.sequence_parallel=true "
                "(each token is routed by the one rank that holds it)")
    return None


def not_yet_combined(job: Job) -> str | None:
    if job.model.n_experts == 0:
        return None
    p, f = job.layout, job.features
    unsupported = {"parallel.pp > 1": p.pp > 1, "parallel.zero=3": p.zero == 3, "train.compile=true": f.compile,
                   "parallel.grad_compression": f.grad_compression != "none",
                   "train.sync": f.sync != "every_step",
                   f"optim.name={f.optimizer}": f.optimizer != "adamw"}
    for name, used in unsupported.items():
        if used:
            return f"{name} with model.n_experts > 0 is not yet supported"
    return None
