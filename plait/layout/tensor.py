"""Tensor (and sequence) parallelism: heads, kv heads and the MLP split evenly over tp ranks."""

from __future__ import annotations

from plait.layout.spec import Job


def tensor_parallel_problem(n_heads: int, n_kv_heads: int, ffn_dim: int, seq_len: int, tp: int,
                            sequence_parallel: bool) -> str | None:
    """Why tensor parallelism over `tp` ranks cannot split this model; `seq_len` is the sequence
    one context-parallel rank holds."""
    if tp == 1:
        return None
    if n_heads % tp:
        return f"model.n_heads={n_heads} is not divisible by parallel.tp={tp}"
    if n_kv_heads < tp:
        return (f"model.n_kv_heads={n_kv_heads} < parallel.tp={tp}: each tp rank needs at least one "
                f"key/value head (plait does not replicate kv heads); use parallel.tp <= {n_kv_heads}")
    if n_kv_heads % tp:
        return f"model.n_kv_heads={n_kv_heads} is not divisible by parallel.tp={tp}"
    if ffn_dim % tp:
        return f"model.ffn_dim={ffn_dim} is not divisible by parallel.tp={tp}"
    if sequence_parallel and seq_len % tp:
        return f"sequence parallelism needs the (per cp rank) sequence {seq_len} divisible by parallel.tp={tp}"
    return None


def split(job: Job) -> str | None:
    m, p = job.model, job.layout
    return tensor_parallel_problem(m.n_heads, m.n_kv_heads, m.ffn_dim, m.seq_len // p.cp, p.tp, p.sequence_parallel)
