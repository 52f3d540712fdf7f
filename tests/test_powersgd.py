"""PowerSGD on 2 gloo processes against the plain summed all-reduce.

One spawned group runs every check; each returns numbers that the test functions judge.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from plait.lowcomm.powersgd import PowerSGDCompressor, compresses, name_seed

WORLD = 2


def plain_sum(grads: dict, comm, group) -> dict:
    """The reference: each tensor all-reduced (summed) on its own."""
    out = {}
    for name, g in grads.items():
        summed = g.clone()
        comm.all_reduce(summed, group, tag="grads")
        out[name] = summed
    return out


def low_rank_grads(rank: int, step: int, r: int) -> dict:
    """Per-rank gradients whose matrices are A_k B_{k,rank}^T: different on each rank but
    sharing A_k's column space, so their sum has rank r too. Plus a vector and a matrix
    too small to compress at rank r."""
    shared = torch.Generator().manual_seed(1000 + step)
    own = torch.Generator().manual_seed(2000 + 10 * step + rank)
    grads = {}
    for name, (n, m) in {"layer.w1": (16, 12), "layer.w2": (10, 24)}.items():
        a = torch.randn(n, r, generator=shared)
        b = torch.randn(m, r, generator=own)
        grads[name] = a @ b.t()
    grads["layer.bias"] = torch.randn(16, generator=own)
    grads["layer.tiny"] = torch.randn(3, 2, generator=own)
    return grads


def random_grads(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(5000 + 10 * step + rank)
    return {"a.weight": torch.randn(12, 10, generator=g), "b.weight": torch.randn(8, 20, generator=g),
            "a.bias": torch.randn(12, generator=g)}


def check_exact_low_rank(rank: int, comm, group) -> dict:
    r = 2
    compressor = PowerSGDCompressor(rank=r, warmup_steps=0)
    worst, vectors_equal = 0.0, True
    for step in (1, 2):  # the second step runs from warm-started Q's
        grads = low_rank_grads(rank, step, r)
        reference = plain_sum(grads, comm, group)
        comm.take_bytes()
        compressor.reduce(grads, group, comm, step)
        sent = comm.take_bytes()
        for name in ("layer.w1", "layer.w2"):
            scale = float(reference[name].abs().max())
            worst = max(worst, float((grads[name] - reference[name]).abs().max()) / scale)
        for name in ("layer.bias", "layer.tiny"):
            vectors_equal &= torch.equal(grads[name], reference[name])
    # all-reduce of B bytes over 2 ranks sends B: P's and Q's in fp32, then the plain tensors
    factor_elems = (16 + 12) * r + (10 + 24) * r
    plain_elems = 16 + 3 * 2
    full_elems = 16 * 12 + 10 * 24 + plain_elems
    return {"worst": worst, "vectors_equal": vectors_equal, "sent": sent,
            "expected_sent": 4 * (factor_elems + plain_elems), "plain_sent": 4 * full_elems,
            "compressed": compressor.compressed_names(grads),
            "q": compressor.q["layer.w1"].clone(), "grad": grads["layer.w1"].clone()}


def check_warmup(rank: int, comm, group) -> dict:
    compressor = PowerSGDCompressor(rank=1, warmup_steps=2)
    equal_during_warmup, sent = [], []
    for step in (1, 2, 3):
        grads = random_grads(rank, step)
        reference = plain_sum(grads, comm, group)
        comm.take_bytes()
        compressor.reduce(grads, group, comm, step)
        sent.append(comm.take_bytes())
        equal_during_warmup.append(all(torch.allclose(grads[n], reference[n], rtol=0, atol=1e-6) for n in grads))
    return {"equal": equal_during_warmup, "sent": sent, "bias_after": torch.equal(grads["a.bias"], reference["a.bias"])}


def check_error_feedback(rank: int, comm, group) -> dict:
    compressor = PowerSGDCompressor(rank=1, warmup_steps=1)
    steps = range(1, 6)
    decompressed = {n: torch.zeros_like(g) for n, g in random_grads(0, 1).items()}
    for step in steps:
        grads = random_grads(rank, step)
        compressor.reduce(grads, group, comm, step)
        for n in grads:
            decompressed[n] += grads[n]
    raw = {n: sum(random_grads(other, step)[n] for other in range(group.size) for step in steps)
           for n in decompressed}
    worst = 0.0
    for n in decompressed:
        residual = compressor.residual.get(n)  # vectors are never compressed and keep none
        residual_sum = torch.zeros_like(decompressed[n])
        if residual is not None:
            residual_sum += residual.reshape_as(residual_sum)
        comm.all_reduce(residual_sum, group, tag="bookkeeping")
        worst = max(worst, float((decompressed[n] + residual_sum - raw[n]).abs().max()))
    lossy = float((decompressed["a.weight"] - raw["a.weight"]).abs().max())
    return {"worst": worst, "lossy": lossy}


def powersgd_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group

    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    return {"exact": check_exact_low_rank(rank, comm, group), "warmup": check_warmup(rank, comm, group),
            "feedback": check_error_feedback(rank, comm, group)}


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(WORLD, powersgd_checks)


def test_exact_low_rank_gradients_equal_plain_all_reduce(results):
    for result in results:
        exact = result["exact"]
        assert exact["compressed"] == ["layer.w1", "layer.w2"]
        assert exact["worst"] < 1e-5
        assert exact["vectors_equal"]  # vectors and too-small matrices go uncompressed
    # every rank ends with the same gradient and the same warm-start Q
    assert torch.equal(results[0]["exact"]["grad"], results[1]["exact"]["grad"])
    assert torch.equal(results[0]["exact"]["q"], results[1]["exact"]["q"])


def test_compressed_bytes(results):
    exact = results[0]["exact"]
    assert exact["sent"] == exact["expected_sent"]
    assert exact["sent"] < exact["plain_sent"] / 2


def test_warmup_steps_are_plain_all_reduce(results):
    for result in results:
        warmup = result["warmup"]
        assert warmup["equal"] == [True, True, False]  # rank 1 of full-rank gradients is lossy
        assert warmup["sent"][0] == warmup["sent"][1] == 4 * (12 * 10 + 8 * 20 + 12)
        assert warmup["sent"][2] == 4 * ((12 + 10) + (8 + 20) + 12)
        assert warmup["bias_after"]


def test_error_feedback_loses_nothing(results):
    for result in results:
        assert result["feedback"]["lossy"] > 1e-2  # the compression did drop something ...
        assert result["feedback"]["worst"] < 1e-4  # ... which the residuals still hold


def test_compression_rule_and_seeds():
    assert compresses((16, 12), 2) and not compresses((3, 2), 2) and not compresses((16,), 1)
    assert not compresses((16, 12), 2, min_compression=4.0)  # 56 * 4 > 192
    assert name_seed("layer.w1", 0) == name_seed("layer.w1", 0) != name_seed("layer.w2", 0)


def test_single_rank_group_keeps_gradients():
    from plait.parallel.comm import Comm, Group

    grads = random_grads(0, 1)
    before = {n: g.clone() for n, g in grads.items()}
    PowerSGDCompressor(rank=1).reduce(grads, Group.single("dp", 0), Comm(), step=5)
    assert all(torch.equal(grads[n], before[n]) for n in grads)
