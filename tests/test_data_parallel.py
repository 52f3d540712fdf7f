"""plait's data parallelism and comm module on 2 gloo processes, against local arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from distributed import run_on_ranks
from plait.parallel.comm import BOOKKEEPING, Comm, Group


class WithUnusedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.first = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)  # gets no gradient: its bucket must still be reduced
        self.second = nn.Linear(8, 1)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def reduced_gradients(stage: int, rank: int, world: int, comm: Comm, group: Group) -> dict:
    """Three accumulation micro-batches on each rank; each bucket's reduced gradient slice
    against the sum of every rank's local gradients, computed by one process."""
    from plait.config import OptimConfig
    from plait.parallel.zero import ZeroEngine

    model = WithUnusedParameter()
    engine = ZeroEngine(model, comm, group, OptimConfig(), stage=stage, dtype="fp32", reduce_dtype="fp32",
                        bucket_bytes=64, device=torch.device("cpu"))  # tiny buckets: a parameter or two each
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * r + k))
               for r in range(world) for k in range(3)]
    calls_before = comm.calls
    for k, x in enumerate(batches[rank * 3:(rank + 1) * 3]):
        with engine.micro_batch(final=k == 2):
            model(x).sum().backward()
        if k < 2 and stage < 2:
            assert comm.calls == calls_before  # resident gradients wait for the last micro-batch
    reference = WithUnusedParameter()
    for x in batches:
        reference(x).sum().backward()
    ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()}
    worst = 0.0
    for b, bucket in enumerate(engine.buckets):
        flat = torch.zeros(bucket.padded)
        for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
            flat[offset:offset + p.numel()] = ref_grads[name].flatten()
        lo, hi = bucket.shard_range(group.rank) if stage >= 1 else (0, bucket.padded)
        worst = max(worst, float((engine.reducer.grad_shard(b) - flat[lo:hi]).abs().max()))
    kept = sum(b.shard_size if stage >= 2 else b.padded for b in engine.buckets)
    return {"worst": worst, "buckets": len(engine.buckets), "grad_bytes": engine.reducer.grad_bytes(),
            "expected_grad_bytes": 4 * kept}


def data_parallel_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    out = {f"stage{stage}": reduced_gradients(stage, rank, world, comm, group) for stage in (0, 1, 2)}
    comm.take_bytes()

    # Accounting of the other collectives, the gloo reduce-scatter fallback included.
    full = torch.arange(8, dtype=torch.float32) * (rank + 1)
    shard = torch.empty(4)
    comm.reduce_scatter(shard, full, group)
    out["reduce_scatter"] = shard.tolist()
    gathered = torch.empty(8)
    comm.all_gather_into(gathered, shard, group)
    out["all_gather"] = gathered.tolist()
    comm.all_gather_object({"rank": rank}, group)  # bookkeeping: not counted
    out["bytes_rs_ag"] = comm.take_bytes()
    out["sequence"] = comm.sequence["dp"]
    out["bookkeeping_tag"] = BOOKKEEPING
    return out


def test_bucketed_reduction_equals_summed_local_gradients():
    results = run_on_ranks(2, data_parallel_checks)
    for out in results:
        for stage in (0, 1, 2):
            assert out[f"stage{stage}"]["worst"] < 1e-5, (stage, out)
            assert out[f"stage{stage}"]["buckets"] >= 3
            # Stages 0-1 keep whole buckets; stage 2 only this rank's half of each one.
            assert out[f"stage{stage}"]["grad_bytes"] == out[f"stage{stage}"]["expected_grad_bytes"]
    # sum over ranks of arange(8) * (r + 1) = 3 * arange(8); rank r keeps half r.
    assert results[0]["reduce_scatter"] == [0.0, 3.0, 6.0, 9.0]
    assert results[1]["reduce_scatter"] == [12.0, 15.0, 18.0, 21.0]
    assert results[0]["all_gather"] == [3.0 * i for i in range(8)] == results[1]["all_gather"]
    # reduce-scatter and all-gather of 32 bytes each send (n-1)/n = half of it.
    assert results[0]["bytes_rs_ag"] == 16 + 16
    assert results[0]["sequence"] == results[1]["sequence"]
