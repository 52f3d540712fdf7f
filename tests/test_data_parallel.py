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


def data_parallel_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.parallel.data_parallel import DataParallel

    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    model = WithUnusedParameter()
    dp = DataParallel(model, comm, group, bucket_bytes=64)  # tiny buckets: one or two params each
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * r + k)) for r in range(world) for k in range(3)]
    mine = batches[rank * 3:(rank + 1) * 3]
    for k, x in enumerate(mine):  # three accumulation micro-batches, synchronised on the last
        context = dp.no_sync() if k < 2 else torch.enable_grad()
        with context:
            model(x).sum().backward()
        if k < 2:
            assert comm.calls == 0  # nothing is communicated before the last micro-batch
    dp.finish_gradient_sync()
    # Reference: one process over every rank's micro-batches, gradients summed.
    reference = WithUnusedParameter()
    for x in batches:
        reference(x).sum().backward()
    out = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(p)
        out[name] = float((p.grad - expected).abs().max())
    out["buckets"] = len(dp.buckets)
    out["grad_bytes_sent"] = comm.take_bytes()
    out["grad_bytes"] = dp.grad_bytes()
    # Views survive: after zero_grad the next backward accumulates into the same buffers.
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    dp.zero_grad()
    model(mine[0]).sum().backward()
    dp.finish_gradient_sync()
    out["views_kept"] = pointers == [p.grad.data_ptr() for p in model.parameters()]
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


def test_bucketed_all_reduce_equals_summed_local_gradients():
    results = run_on_ranks(2, data_parallel_checks)
    for out in results:
        for name in ("first.weight", "first.bias", "unused.weight", "unused.bias", "second.weight", "second.bias"):
            assert out[name] < 1e-5, (name, out[name])
        assert out["buckets"] >= 3
        assert out["grad_bytes_sent"] == out["grad_bytes"]  # 2(n-1)/n = 1 at n = 2
        assert out["views_kept"]
        # sum over ranks of arange(8) * (r + 1) = 3 * arange(8); rank r keeps half r.
    assert results[0]["reduce_scatter"] == [0.0, 3.0, 6.0, 9.0]
    assert results[1]["reduce_scatter"] == [12.0, 15.0, 18.0, 21.0]
    assert results[0]["all_gather"] == [3.0 * i for i in range(8)] == results[1]["all_gather"]
    # reduce-scatter and all-gather of 32 bytes each send (n-1)/n = half of it.
    assert results[0]["bytes_rs_ag"] == 16 + 16
    assert results[0]["sequence"] == results[1]["sequence"]
