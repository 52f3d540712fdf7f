"""Context parallel: ring attention against scaled_dot_product_attention on the full sequence,
and a whole context-parallel Transformer against the dense one, on 2 and 4 gloo ranks (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from plait.parallel.context import cp_positions, split_for_cp

TOL = 1e-5


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def ring_checks(rank: int, world: int, group, comm, kv_heads: int) -> dict[str, float]:
    from plait.parallel.context import ring_attention

    gen = torch.Generator().manual_seed(kv_heads)
    batch, heads, seq, head_dim = 2, 4, 8 * world, 8
    q = torch.randn(batch, heads, seq, head_dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=gen) for _ in range(2))
    weights = torch.randn(batch, heads, seq, head_dim, generator=gen)
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    out_dense = F.scaled_dot_product_attention(*dense, is_causal=True, enable_gqa=kv_heads != heads)
    (out_dense * weights).sum().backward()

    positions = cp_positions(seq, rank, world)
    local = [t.index_select(2, positions).requires_grad_() for t in (q, k, v)]
    comm.take_bytes()
    out = ring_attention(*local, group, comm)
    forward_bytes = comm.take_bytes()
    (out * weights.index_select(2, positions)).sum().backward()
    backward_bytes = comm.take_bytes()
    kv_bytes = 2 * k.numel() // world * 4  # this rank's k and v, fp32
    tag = f"kv{kv_heads}"
    result = {f"ring_{tag}_out": _diff(out.detach(), out_dense.detach().index_select(2, positions))}
    for name, mine, reference in zip("qkv", local, dense):
        result[f"ring_{tag}_d{name}"] = _diff(mine.grad, reference.grad.index_select(2, positions))
    # Forward: cp-1 hops of k,v. Backward: cp-1 hops of k,v and cp hops of their gradients.
    result[f"ring_{tag}_bytes_wrong"] = float(
        forward_bytes != (world - 1) * kv_bytes or backward_bytes != (2 * world - 1) * kv_bytes)
    return result


def model_checks(rank: int, world: int, group, comm) -> dict[str, float]:
    """A whole Transformer with ring attention, global rotary positions and the zigzag split."""
    from plait.config import ModelConfig
    from plait.model import build_model
    from plait.parallel.context import apply_context_parallel

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=40, seq_len=4 * world)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=torch.Generator().manual_seed(7))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    dense = build_model(cfg, seed=2)
    loss_dense = F.cross_entropy(dense(inputs).flatten(0, 1), targets.flatten(), reduction="sum") / targets.numel()
    loss_dense.backward()

    model = build_model(cfg, seed=2)
    apply_context_parallel(model, group, comm)
    local_inputs, positions = split_for_cp(inputs, rank, world)
    local_targets, _ = split_for_cp(targets, rank, world)
    logits = model(local_inputs, positions)
    loss = F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), reduction="sum") / targets.numel()
    loss.backward()
    total = loss.detach().clone()
    comm.all_reduce(total, group)
    out = {"model_loss": abs(total.item() - loss_dense.item())}
    dense_params = dict(dense.named_parameters())
    relative = []
    for name, param in model.named_parameters():
        comm.all_reduce(param.grad, group)  # cp ranks saw different tokens: sum like data parallel
        reference = dense_params[name].grad
        relative.append(_diff(param.grad, reference) / float(reference.abs().max()))
    out["model_grads_relative"] = max(relative)
    return out


def context_parallel_checks(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group

    group, comm = Group("cp", list(range(world)), rank, dist.group.WORLD), Comm()
    out: dict[str, float] = {}
    for kv_heads in (4, 2, 1):  # plain multi-head, GQA, multi-query
        out.update(ring_checks(rank, world, group, comm, kv_heads))
    out.update(model_checks(rank, world, group, comm))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_full_sequence_attention(world):
    results = run_on_ranks(world, context_parallel_checks)
    for rank, out in enumerate(results):
        assert len(out) == 3 * 5 + 2
        for name, diff in out.items():
            assert diff < TOL, (world, rank, name, diff)


def test_zigzag_split_balances_and_covers_the_sequence():
    tokens = torch.arange(16).view(1, 16)
    parts = [split_for_cp(tokens, r, 4) for r in range(4)]
    assert parts[0][0].tolist() == [[0, 1, 14, 15]] and parts[3][0].tolist() == [[6, 7, 8, 9]]
    assert sorted(torch.cat([p for _, p in parts]).tolist()) == list(range(16))
    for local, positions in parts:
        assert torch.equal(local[0], positions)
        # equal causal work: the number of (query, key) pairs each rank's queries attend to
        assert int((positions + 1).sum()) == 34
    with pytest.raises(ValueError, match="divisible by 2 x cp"):
        cp_positions(12, 0, 4)
