"""DiLoCo, NoLoCo and CO2 on 4 gloo processes, against every-step data parallel, plain
training and each other; NoLoCo's groups and fragment partitions as pure functions."""

from __future__ import annotations

import torch
from torch import nn

from distributed import run_on_ranks
from plait.lowcomm.outer import noloco_groups, partition_fragments
from plait.parallel.comm import Comm, Group

WORLD = 4


def tiny_model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every worker
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def loss_backward(model: nn.Module, worker: int, step: int) -> None:
    """Each worker's own batch at each step."""
    generator = torch.Generator().manual_seed(1000 * worker + step)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    ((model(x) - y) ** 2).mean().backward()


def local_training(model, inner, outer, worker: int, steps: int) -> torch.Tensor:
    for step in range(1, steps + 1):
        inner.zero_grad()
        loss_backward(model, worker, step)
        inner.step()
        outer.after_inner_step(step)
    return flat(model)


def every_step_data_parallel(comm: Comm, group: Group, steps: int) -> torch.Tensor:
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        sgd.zero_grad()
        loss_backward(model, group.rank, step)
        for p in model.parameters():
            comm.all_reduce(p.grad, group)
            p.grad /= group.size
        sgd.step()
    return flat(model)


def outer_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.lowcomm.outer import CO2, DiLoCo, NoLoCo
    from plait.parallel.comm import BOOKKEEPING

    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    out: dict = {}
    gather = lambda obj: comm.all_gather_object(obj, group, tag=BOOKKEEPING)  # noqa: E731

    # DiLoCo, H = 1, inner SGD, outer SGD lr 1 without momentum == every-step data parallel.
    expected = every_step_data_parallel(comm, group, steps=4)
    comm.take_bytes()
    model = tiny_model()
    diloco = DiLoCo(model.parameters(), comm, group, inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    got = local_training(model, torch.optim.SGD(model.parameters(), lr=0.1), diloco, rank, steps=4)
    out["diloco_vs_dp"] = float((got - expected).abs().max())
    out["sync_tags"] = sorted(comm.bytes_by_tag)

    # Same with bf16 pseudo-gradients: close, not exact.
    model = tiny_model()
    diloco = DiLoCo(model.parameters(), comm, group, inner_steps=1, outer_lr=1.0, outer_momentum=0.0,
                    bf16_pseudo_grads=True)
    got = local_training(model, torch.optim.SGD(model.parameters(), lr=0.1), diloco, rank, steps=4)
    out["diloco_bf16_vs_dp"] = float((got - expected).abs().max())

    # One worker, H = 3, inner AdamW, outer lr 1 without momentum == plain AdamW training.
    alone = Group.single("alone", rank)
    reference = tiny_model()
    adamw = torch.optim.AdamW(reference.parameters(), lr=0.01)
    for step in range(1, 7):
        adamw.zero_grad()
        loss_backward(reference, rank, step)
        adamw.step()
    model = tiny_model()
    diloco = DiLoCo(model.parameters(), comm, alone, inner_steps=3, outer_lr=1.0, outer_momentum=0.0)
    got = local_training(model, torch.optim.AdamW(model.parameters(), lr=0.01), diloco, rank, steps=6)
    out["diloco_one_worker_vs_plain"] = float((got - flat(reference)).abs().max())

    # NoLoCo with one group of every worker == DiLoCo(outer_lr=α, outer_momentum=β, no Nesterov).
    model = tiny_model()
    diloco = DiLoCo(model.parameters(), comm, group, inner_steps=2, outer_lr=0.7, outer_momentum=0.5,
                    nesterov=False)
    expected = local_training(model, torch.optim.SGD(model.parameters(), lr=0.1), diloco, rank, steps=6)
    model = tiny_model()
    noloco = NoLoCo(model.parameters(), comm, group, inner_steps=2, outer_lr=0.7, outer_momentum=0.5,
                    group_size=world)
    got = local_training(model, torch.optim.SGD(model.parameters(), lr=0.1), noloco, rank, steps=6)
    out["noloco_one_group_vs_diloco"] = float((got - expected).abs().max())
    out["noloco_one_group"] = noloco.last_groups

    # NoLoCo in pairs: the groups agree on every rank; one sync against the formula, from
    # every worker's θ gathered beforehand.
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    noloco = NoLoCo(model.parameters(), comm, group, inner_steps=2, outer_lr=0.7, outer_momentum=0.5,
                    group_size=2, seed=3)
    worst, groups_seen = 0.0, []
    for step in range(1, 7):
        sgd.zero_grad()
        loss_backward(model, rank, step)
        sgd.step()
        thetas = gather(flat(model))
        phi, momentum = noloco.global_weights.clone(), noloco.momentum.clone()
        if noloco.after_inner_step(step):
            groups_seen.append(noloco.last_groups)
            mine = next(g for g in noloco.last_groups if rank in g)
            if step == 2:  # φ was the same everywhere: the two members of a pair now agree bit for bit
                every = gather(flat(model))
                out["noloco_pair_members_equal"] = all(torch.equal(every[j], every[mine[0]]) for j in mine)
            phis = gather(phi)
            mean_phi = sum(phis[j] for j in mine) / len(mine)
            mean_delta = sum(thetas[j] - phis[j] for j in mine) / len(mine)
            momentum = 0.5 * momentum + 0.7 * mean_delta + 0.7 * (mean_phi - phi)
            worst = max(worst, float((flat(model) - (phi + momentum)).abs().max()))
        elif step % 2 == 0:
            raise AssertionError("NoLoCo skipped a sync")
    out["noloco_pairs_vs_formula"] = worst
    out["noloco_groups"] = groups_seen
    out["noloco_groups_all_ranks"] = gather(groups_seen)

    # CO2 with a constant gradient c_r per worker: round k moves θ by -H·lr·c_r, and the
    # update applied at sync k is round k-1's average (none at the first sync).
    weight = nn.Parameter(torch.zeros(5))
    constant = torch.arange(5, dtype=torch.float32) * (rank + 1)
    mean_constant = torch.arange(5, dtype=torch.float32) * (world + 1) / 2
    sgd = torch.optim.SGD([weight], lr=0.1)
    co2 = CO2([weight], comm, group, inner_steps=2, outer_lr=1.0, outer_momentum=0.0)
    staleness = []
    for step in range(1, 7):
        weight.grad = constant.clone()
        sgd.step()
        if co2.after_inner_step(step):
            rounds_applied = step // 2 - 1
            staleness.append(float((weight.detach() + rounds_applied * 2 * 0.1 * mean_constant).abs().max()))
    co2.flush()  # the third round lands
    staleness.append(float((weight.detach() + 3 * 2 * 0.1 * mean_constant).abs().max()))
    out["co2_staleness"] = staleness

    # CO2's momentum with λ_gap and clipping: m = β·m + Δ̄/λ, clipped to |m| <= clip.
    weight = nn.Parameter(torch.zeros(5))
    sgd = torch.optim.SGD([weight], lr=0.1)
    co2 = CO2([weight], comm, group, inner_steps=1, outer_lr=0.5, outer_momentum=0.5, gap_penalty=2.0, clip=0.05)
    for step in range(1, 4):
        weight.grad = constant.clone()
        sgd.step()
        co2.after_inner_step(step)
    pseudo = 0.1 * mean_constant  # every round's averaged pseudo-gradient
    momentum = torch.zeros(5)
    phi = torch.zeros(5)
    for _ in range(2):  # syncs 2 and 3 apply rounds 1 and 2
        momentum = 0.5 * momentum + pseudo / 2.0
        momentum = momentum * min(1.0, 0.05 / float(momentum.norm()))
        phi = phi - 0.5 * momentum
    out["co2_momentum_clip"] = float((weight.detach() - phi).abs().max())
    out["co2_clipped_norm"] = float(co2.momentum.norm())

    # Streaming DiLoCo: 2 fragments, H = 4: fragment 1 syncs at steps 2 and 6, fragment 0 at 4 and 8.
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = DiLoCo(model.parameters(), comm, group, inner_steps=4, outer_lr=0.7, outer_momentum=0.9,
                    fragments=2, alpha=0.0)
    schedule, agreement = [], []
    for step in range(1, 9):
        sgd.zero_grad()
        loss_backward(model, rank, step)
        sgd.step()
        schedule.append(diloco.fragments_due(step))
        diloco.after_inner_step(step)
        if step in (2, 4):
            params = list(model.parameters())
            parts = [torch.cat([params[i].detach().flatten() for i in part]) for part in diloco.fragments]
            every = gather(parts)
            agreement.append([all(torch.equal(every[0][f], every[r][f]) for r in range(world))
                              for f in range(2)])
    out["stream_schedule"] = schedule
    out["stream_agreement"] = agreement
    return out


def test_outer_optimizers_on_four_workers():
    results = run_on_ranks(WORLD, outer_checks)
    for rank, out in enumerate(results):
        assert out["diloco_vs_dp"] < 1e-6, (rank, out["diloco_vs_dp"])
        assert out["sync_tags"] == ["sync"]
        assert out["diloco_bf16_vs_dp"] < 1e-2
        assert out["diloco_one_worker_vs_plain"] < 1e-6
        assert out["noloco_one_group_vs_diloco"] < 1e-6
        assert out["noloco_one_group"] == [list(range(WORLD))]
        assert out["noloco_pairs_vs_formula"] < 1e-6
        assert out["noloco_pair_members_equal"]
        assert out["noloco_groups_all_ranks"] == [out["noloco_groups"]] * WORLD
        assert max(out["co2_staleness"]) < 1e-6, out["co2_staleness"]
        assert out["co2_momentum_clip"] < 1e-6
        assert abs(out["co2_clipped_norm"] - 0.05) < 1e-6
        assert out["stream_schedule"] == [[], [1], [], [0], [], [1], [], [0]]
        assert out["stream_agreement"] == [[False, True], [True, False]]  # only the fragment just synced agrees
    assert results[0]["noloco_groups"] == [noloco_groups(s, WORLD, 2, seed=3) for s in (2, 4, 6)]


def test_noloco_groups_partition_the_workers_the_same_way_each_call():
    for world, size in [(1, 2), (2, 2), (4, 2), (5, 2), (7, 3), (8, 4), (16, 2)]:
        for step in range(5):
            groups = noloco_groups(step, world, size, seed=11)
            assert groups == noloco_groups(step, world, size, seed=11)
            assert sorted(m for g in groups for m in g) == list(range(world))
            assert all(min(size, world) <= len(g) < max(2 * size, world + 1) for g in groups)
    draws = {tuple(map(tuple, noloco_groups(step, 8, 2))) for step in range(10)}
    assert len(draws) > 1  # the pairing changes from sync to sync


def test_fragments_are_contiguous_balanced_and_non_empty():
    assert partition_fragments([10, 10, 10, 10], 2) == [[0, 1], [2, 3]]
    assert partition_fragments([100, 1, 1, 1], 3) == [[0], [1], [2, 3]]
    assert partition_fragments([1, 1, 1, 100], 3) == [[0, 1], [2], [3]]
    assert partition_fragments([4, 4, 4], 3) == [[0], [1], [2]]
    assert partition_fragments([7], 1) == [[0]]


def test_outer_state_round_trips_through_a_restart():
    """Stop after step 3 (mid-round, CO2 with an average in flight), rebuild from the saved
    weights and outer state, finish: the same as an uninterrupted run."""
    from plait.lowcomm.outer import CO2, DiLoCo, NoLoCo

    alone = Group.single("alone", 0)
    builders = [
        lambda params: DiLoCo(params, Comm(), alone, inner_steps=2, outer_lr=0.7, outer_momentum=0.9),
        lambda params: NoLoCo(params, Comm(), alone, inner_steps=2, outer_lr=0.7, outer_momentum=0.5),
        lambda params: CO2(params, Comm(), alone, inner_steps=1, outer_lr=0.9, outer_momentum=0.5),
    ]
    for build in builders:
        model = tiny_model()
        expected = local_training(model, torch.optim.SGD(model.parameters(), lr=0.1), build(model.parameters()),
                                  worker=0, steps=6)
        model = tiny_model()
        outer = build(model.parameters())
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, 4):
            sgd.zero_grad()
            loss_backward(model, 0, step)
            sgd.step()
            outer.after_inner_step(step)
        saved_weights, saved_outer = [p.detach().clone() for p in model.parameters()], outer.state_dict()
        model = tiny_model()
        with torch.no_grad():
            for p, w in zip(model.parameters(), saved_weights):
                p.copy_(w)
        outer = build(model.parameters())
        outer.load_state_dict(saved_outer)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4, 7):
            sgd.zero_grad()
            loss_backward(model, 0, step)
            sgd.step()
            outer.after_inner_step(step)
        assert float((flat(model) - expected).abs().max()) < 1e-7
