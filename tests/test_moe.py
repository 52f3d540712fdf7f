"""Mixture of experts: the layer against a per-token loop, capacity dropping, the balance
losses, global-batch LBL over 2 dp ranks x 2 micro-batches against one process on the
concatenated batch, and expert parallelism (ep=2, gloo) against the single-process layer,
with balanced, totally imbalanced and expert-starving routing (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from plait.config import ModelConfig
from plait.model.init import init_parameters
from plait.model.moe import MoE, expert_capacity
from plait.parallel.moe_losses import load_balancing_loss, router_z_loss

TOL = 1e-5
DIM, FFN = 16, 24


def make_moe(seed: int = 0, **kwargs) -> MoE:
    moe = MoE(DIM, FFN, **kwargs)
    init_parameters(moe, seed, ModelConfig(dim=DIM, ffn_dim=FFN, n_layers=2))
    with torch.no_grad():  # std 0.1 rather than 0.02: outputs and gradients near order 1, so
        for p in moe.parameters():  # that the tolerance is a tight one
            p.mul_(5.0)
    return moe


def bias_router(moe: MoE, favoured: int | None = None, starved: int | None = None) -> None:
    """Inputs from `tokens(..., steer=True)` carry a constant feature 0, so router column 0
    decides: a large weight pulls every token to one expert, a negative one starves it."""
    with torch.no_grad():
        if favoured is not None:
            moe.router.weight[favoured, 0] = 20.0
        if starved is not None:
            moe.router.weight[starved, 0] = -20.0


def tokens(shape: tuple[int, ...], seed: int, steer: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(seed))
    if steer:
        x[..., 0] = 1.0
    return x


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: route, drop a slot once its expert has taken `capacity` earlier tokens,
    and sum the weighted SwiGLUs written out with plain matrix products."""
    flat = x.reshape(-1, DIM)
    capacity = expert_capacity(flat.shape[0], moe.top_k, moe.n_experts, moe.capacity_factor)
    taken = [0] * moe.n_experts
    rows = []
    e = moe.experts
    for t in range(flat.shape[0]):
        xt = flat[t]
        logits = moe.router.weight @ xt
        scores = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
        top, chosen = scores.topk(moe.top_k)
        weights = top / top.sum()
        out = torch.zeros(DIM)
        for w, i in zip(weights, chosen.tolist()):
            taken[i] += 1
            if capacity is not None and taken[i] > capacity:
                continue
            out = out + w * (e.w_down[i] @ (F.silu(e.w_gate[i] @ xt) * (e.w_up[i] @ xt)))
        if moe.shared is not None:
            s = moe.shared
            out = out + s.w_down.weight @ (F.silu(s.w_gate.weight @ xt) * (s.w_up.weight @ xt))
        rows.append(out)
    return torch.stack(rows).reshape(x.shape)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's magnitude where that exceeds 1 (fp32
    rounding grows with it)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(diff(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs", [
    dict(n_experts=4, top_k=2),
    dict(n_experts=4, top_k=2, n_shared_experts=2, score="sigmoid"),
    dict(n_experts=8, top_k=1, capacity_factor=1.0),
    dict(n_experts=4, top_k=2, capacity_factor=0.5, n_shared_experts=1),
])
def test_layer_matches_per_token_loop(kwargs):
    x = tokens((3, 5), seed=1)
    target = tokens((3, 5), seed=2)
    moe = make_moe(**kwargs)
    out, stats = moe(x)
    (out * target).sum().backward()
    fast = grads(moe)
    moe.zero_grad()
    reference = naive_moe(moe, x)
    (reference * target).sum().backward()
    assert diff(out, reference) < TOL
    assert max_diff(fast, grads(moe)) < TOL
    assert int(stats.counts.sum()) == 15 * moe.top_k and stats.n_tokens == 15
    assert torch.allclose(stats.probs_mean.sum(), torch.tensor(1.0))


def test_capacity_drops_later_tokens_and_dropless_keeps_all():
    x = tokens((12,), seed=3, steer=True)
    dropless = make_moe(n_experts=4, top_k=1)
    bias_router(dropless, favoured=2)
    capped = make_moe(n_experts=4, top_k=1, capacity_factor=1.0)  # capacity ceil(12/4) = 3
    capped.load_state_dict(dropless.state_dict())
    full, full_stats = dropless(x)
    out, stats = capped(x)
    assert full_stats.counts.tolist() == [0, 0, 12, 0] and full_stats.dropped_fraction == 0.0
    assert stats.counts.tolist() == [0, 0, 12, 0]  # counts are before dropping
    assert stats.dropped_fraction == pytest.approx(9 / 12)
    # The first three tokens keep their expert; the rest get nothing from the MoE.
    assert torch.allclose(out[:3], full[:3], rtol=0, atol=1e-7)  # same math, other batch shape
    assert torch.equal(out[3:], torch.zeros(9, DIM))
    assert expert_capacity(10, 2, 4, 1.25) == 7 and expert_capacity(10, 2, 4, 0) is None


def test_load_balancing_and_z_loss_values():
    uniform = load_balancing_loss(torch.tensor([5, 5, 5, 5]), torch.full((4,), 0.25))
    collapse = load_balancing_loss(torch.tensor([20, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0]))
    assert uniform.item() == pytest.approx(1.0) and collapse.item() == pytest.approx(4.0)
    # Through a layer: every token sent to one expert with near-certain probability gives N_E.
    moe = make_moe(n_experts=8, top_k=1)
    bias_router(moe, favoured=5)
    _, stats = moe(tokens((32,), seed=4, steer=True))
    assert load_balancing_loss(stats.counts, stats.probs_mean).item() == pytest.approx(8.0, rel=1e-4)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item())


# --- distributed checks ------------------------------------------------------------------

MICRO_BATCHES, MICRO_TOKENS = 2, 6


def steer_by_domain(moe: MoE) -> None:
    with torch.no_grad():
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 2.0, -2.0


def global_lbl_checks(rank: int, world: int, group, comm) -> dict[str, float]:
    """2 dp ranks x 2 micro-batches vs one process on all 4 micro-batches concatenated."""
    from plait.parallel.moe_losses import GlobalBatchCounts

    # Micro-batches from two "domains" (feature 0 = +1 or -1) that prefer experts 0 or 1:
    # balanced over the global batch, not within a micro-batch.
    batches = [tokens((MICRO_TOKENS,), seed=100 + i) for i in range(world * MICRO_BATCHES)]
    for i, batch in enumerate(batches):
        batch[:, 0] = 1.0 if i % 2 == 0 else -1.0
    reference = make_moe(n_experts=4, top_k=2)
    steer_by_domain(reference)
    _, stats = reference(torch.cat(batches))
    ref_loss = load_balancing_loss(stats.counts, stats.probs_mean)
    ref_loss.backward()

    moe = make_moe(n_experts=4, top_k=2)
    steer_by_domain(moe)
    accumulated = GlobalBatchCounts(4, 2, group, comm)
    prob_sums = []
    micro_losses = []
    for m in range(MICRO_BATCHES):
        _, stats = moe(batches[rank * MICRO_BATCHES + m])
        accumulated.add(stats.counts)
        prob_sums.append(stats.prob_sum)
        micro_losses.append(load_balancing_loss(stats.counts, stats.probs_mean).item())
    loss = accumulated.loss(torch.stack(prob_sums).sum(0))
    loss.backward()
    total = loss.detach().clone()
    comm.all_reduce(total, group, tag="bookkeeping")
    router_grad = moe.router.weight.grad.clone()
    comm.all_reduce(router_grad, group)  # data parallelism sums gradients
    accumulated.reset()
    return {
        "global_lbl_value": diff(total, ref_loss),
        "global_lbl_router_grad": diff(router_grad, reference.router.weight.grad),
        # sanity: the micro-batch scope really is a different number here
        "micro_scope_differs": float(abs(sum(micro_losses) / len(micro_losses) - ref_loss.item()) < 1e-3),
    }


def expert_parallel_case(rank: int, world: int, group, comm, name: str, kwargs: dict,
                         favoured=None, starved=None, routing_as_meant=None) -> dict[str, float]:
    from plait.parallel.expert import apply_expert_parallel

    inputs = [tokens((2, 5 + 2 * r), seed=200 + r, steer=True) for r in range(world)]  # unequal sizes
    targets = [tokens((2, 5 + 2 * r), seed=300 + r) for r in range(world)]

    reference = make_moe(**kwargs)
    bias_router(reference, favoured, starved)
    ref_out, ref_counts, ref_dropped = [], 0, 0.0
    for x, t in zip(inputs, targets):  # each rank's tokens routed (and capacity-capped) separately
        out, stats = reference(x)
        (out * t).sum().backward()
        ref_out.append(out.detach())
        ref_counts, ref_dropped = ref_counts + stats.counts, max(ref_dropped, stats.dropped_fraction)
    ref_grads = grads(reference)

    moe = make_moe(**kwargs)
    bias_router(moe, favoured, starved)
    apply_expert_parallel(moe, group, comm)
    comm.take_bytes()
    out, stats = moe(inputs[rank])
    forward_bytes = comm.take_bytes()
    (out * targets[rank]).sum().backward()
    mine = grads(moe)
    for key in mine:
        if not key.startswith("experts."):
            comm.all_reduce(mine[key], group)  # replicated: summed like data-parallel gradients
    local = slice(moe.experts.first_expert, moe.experts.first_expert + moe.experts.n_local)
    expected = {k: (v[local] if k.startswith("experts.") else v) for k, v in ref_grads.items()}

    # Forward traffic: counts (E/ep int64 to the other rank) + token rows there and back.
    n_local = moe.experts.n_local
    counts = torch.tensor(comm.all_gather_object(_kept_counts(moe, stats), group))  # [rank, expert]
    other = 1 - rank
    rows_out = int(counts[rank].view(world, n_local)[other].sum())  # mine, to its experts
    rows_in = int(counts[other].view(world, n_local)[rank].sum())
    expected_bytes = n_local * 8 + (rows_out + rows_in) * DIM * 4
    return {
        f"ep_{name}_out": diff(out, ref_out[rank]),
        f"ep_{name}_grads": max_diff(mine, expected),
        f"ep_{name}_bytes_wrong": float(forward_bytes != expected_bytes),
        f"ep_{name}_routing_not_as_meant": float(not routing_as_meant(ref_counts.tolist(), ref_dropped)),
        f"ep_{name}_grad_scale_small": float(max(float(v.abs().max()) for v in ref_grads.values()) < 0.01),
    }


def _kept_counts(moe: MoE, stats) -> list[int]:
    capacity = expert_capacity(stats.n_tokens, moe.top_k, moe.n_experts, moe.capacity_factor)
    return stats.counts.tolist() if capacity is None else stats.counts.clamp(max=capacity).tolist()


def distributed_checks(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group

    group, comm = Group("ep", list(range(world)), rank, dist.group.WORLD), Comm()
    out = global_lbl_checks(rank, world, group, comm)
    out.update(expert_parallel_case(
        rank, world, group, comm, "balanced", dict(n_experts=4, top_k=2, n_shared_experts=1),
        routing_as_meant=lambda counts, dropped: min(counts) > 0 and dropped == 0))
    out.update(expert_parallel_case(  # rank 0's experts receive nothing at all
        rank, world, group, comm, "all_to_one", dict(n_experts=4, top_k=1), favoured=3,
        routing_as_meant=lambda counts, dropped: counts[:3] == [0, 0, 0]))
    out.update(expert_parallel_case(  # expert 1 receives nothing; the others overflow
        rank, world, group, comm, "starved_capped",
        dict(n_experts=4, top_k=2, capacity_factor=1.0, score="sigmoid"), starved=1,
        routing_as_meant=lambda counts, dropped: counts[1] == 0 and dropped > 0))
    return out


def test_global_batch_lbl_and_expert_parallel_match_single_process():
    results = run_on_ranks(2, distributed_checks)
    for rank, out in enumerate(results):
        assert len(out) == 3 + 3 * 5
        assert out.pop("micro_scope_differs") == 0.0, rank
        for name, diff in out.items():
            assert diff < TOL, (rank, name, diff)
