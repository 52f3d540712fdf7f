"""Tensor (and sequence) parallel pieces on 2 and 4 gloo ranks against their dense counterparts.

One spawned group per world size runs every check; each check returns the largest absolute
difference from the dense computation (fp32), and the test asserts it is below 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from plait.config import ModelConfig
from plait.errors import ConfigError
from plait.parallel.tensor import check_tensor_parallel, shard_for_tp

TOL = 1e-5
VOCAB = 37  # divisible by neither 2 nor 4: the vocabulary gets padded


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value: model gradients are ~1e-3."""
    return _diff(a, b) / max(float(b.abs().max()), 1e-30)


def _seq_slice(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return x.chunk(size, dim=1)[rank]


def linear_pair_checks(rank: int, world: int, group, comm, sequence_parallel: bool) -> dict[str, float]:
    """Column-parallel then row-parallel linear (a Megatron MLP) against two dense matmuls."""
    from plait.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, generator=gen)
    w1, w2 = torch.randn(20, 12, generator=gen) * 0.3, torch.randn(12, 20, generator=gen) * 0.3
    weights = torch.randn(2, 8, 12, generator=gen)  # a non-uniform upstream gradient
    x_dense = x.clone().requires_grad_()
    w1_dense, w2_dense = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    y_dense = F.silu(x_dense @ w1_dense.T) @ w2_dense.T
    (y_dense * weights).sum().backward()

    column = ColumnParallelLinear(12, 20, group, comm, sequence_parallel)
    row = RowParallelLinear(20, 12, group, comm, sequence_parallel)
    with torch.no_grad():
        column.weight.copy_(shard_for_tp(w1, 0, rank, world))
        row.weight.copy_(shard_for_tp(w2, 1, rank, world))
    x_local = (_seq_slice(x, rank, world) if sequence_parallel else x).clone().requires_grad_()
    y = row(F.silu(column(x_local)))
    expected_y = _seq_slice(y_dense, rank, world) if sequence_parallel else y_dense
    local_weights = _seq_slice(weights, rank, world) if sequence_parallel else weights
    (y * local_weights).sum().backward()
    expected_dx = _seq_slice(x_dense.grad, rank, world) if sequence_parallel else x_dense.grad
    tag = "sp" if sequence_parallel else "nosp"
    return {
        f"linear_{tag}_out": _diff(y.detach(), expected_y.detach()),
        f"linear_{tag}_dx": _diff(x_local.grad, expected_dx),
        f"linear_{tag}_dw_column": _diff(column.weight.grad, shard_for_tp(w1_dense.grad, 0, rank, world)),
        f"linear_{tag}_dw_row": _diff(row.weight.grad, shard_for_tp(w2_dense.grad, 1, rank, world)),
    }


def embedding_checks(rank: int, world: int, group, comm, sequence_parallel: bool) -> dict[str, float]:
    from plait.parallel.tensor import VocabParallelEmbedding

    gen = torch.Generator().manual_seed(1)
    table = torch.randn(VOCAB, 6, generator=gen)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=gen)
    tokens[0, 0], tokens[1, -1] = VOCAB - 1, 0  # the first and the last row (owned by different ranks)
    weights = torch.randn(2, 8, 6, generator=gen)
    dense = table.clone().requires_grad_()
    out_dense = F.embedding(tokens, dense)
    (out_dense * weights).sum().backward()

    emb = VocabParallelEmbedding(VOCAB, 6, group, comm, sequence_parallel)
    with torch.no_grad():
        emb.weight.copy_(shard_for_tp(table, 0, rank, world))
    out = emb(tokens)
    if sequence_parallel:
        out_dense, weights = _seq_slice(out_dense, rank, world), _seq_slice(weights, rank, world)
    (out * weights).sum().backward()
    tag = "sp" if sequence_parallel else "nosp"
    return {
        f"embedding_{tag}_out": _diff(out.detach(), out_dense.detach()),
        # padded rows (zeros in the sliced dense gradient) must get no gradient either
        f"embedding_{tag}_dw": _diff(emb.weight.grad, shard_for_tp(dense.grad, 0, rank, world)),
    }


def cross_entropy_checks(rank: int, world: int, group, comm) -> dict[str, float]:
    from plait.parallel.tensor import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(2)
    # Strongly negative logits: a padded column (logit 0) would dominate the softmax if it leaked in.
    logits = torch.randn(3, 5, VOCAB, generator=gen) * 3 - 20
    targets = torch.randint(0, VOCAB, (3, 5), generator=gen)
    targets[0, 0] = VOCAB - 1
    weights = torch.rand(3, 5, generator=gen)
    dense = logits.clone().requires_grad_()
    loss_dense = F.cross_entropy(dense.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    (loss_dense * weights).sum().backward()

    local = shard_for_tp(logits, 2, rank, world).requires_grad_()  # padded columns are zeros
    loss = vocab_parallel_cross_entropy(local, targets, group, comm, VOCAB)
    (loss * weights).sum().backward()
    return {
        "ce_loss": _diff(loss.detach(), loss_dense.detach()),
        "ce_grad": _diff(local.grad, shard_for_tp(dense.grad, 2, rank, world)),
    }


def model_checks(rank: int, world: int, group, comm, cfg: ModelConfig, sequence_parallel: bool, label: str) -> dict[str, float]:
    """A whole tensor-parallel Transformer: init, loss and every gradient against the dense model."""
    from plait.model import build_model
    from plait.model.init import init_tensor
    from plait.parallel.tensor import (apply_tensor_parallel, gather_full,
                                       vocab_parallel_cross_entropy)

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    dense = build_model(cfg, seed=5)
    loss_dense = F.cross_entropy(dense(inputs).flatten(0, 1), targets.flatten(), reduction="sum") / targets.numel()
    loss_dense.backward()

    model = build_model(cfg, seed=5)
    shards = apply_tensor_parallel(model, group, comm, sequence_parallel, seed=5)
    out = {f"{label}_names": float(set(dict(model.named_parameters())) != set(dict(dense.named_parameters())))}
    out[f"{label}_init"] = max(
        _diff(p.detach(), shard_for_tp(init_tensor(5, name, shards[name].full_shape, cfg), shards[name].dim, rank, world))
        for name, p in model.named_parameters() if name in shards)
    loss = vocab_parallel_cross_entropy(model(inputs), targets, group, comm, cfg.vocab_size).sum() / targets.numel()
    loss.backward()
    out[f"{label}_loss"] = abs(loss.item() - loss_dense.item())
    dense_params = dict(dense.named_parameters())
    grad_diffs = []
    for name, param in model.named_parameters():
        grad = gather_full(param.grad, shards[name], group, comm) if name in shards else param.grad
        grad_diffs.append(_relative_diff(grad, dense_params[name].grad))
    out[f"{label}_grads_relative"] = max(grad_diffs)
    return out


def tensor_parallel_checks(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group

    group, comm = Group("tp", list(range(world)), rank, dist.group.WORLD), Comm()
    out: dict[str, float] = {}
    for sp in (False, True):
        out.update(linear_pair_checks(rank, world, group, comm, sp))
        out.update(embedding_checks(rank, world, group, comm, sp))
    out.update(cross_entropy_checks(rank, world, group, comm))
    base = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=48, vocab_size=VOCAB, seq_len=8)
    if world == 2:  # GQA: 2 kv heads, one per rank
        cfg = ModelConfig(**base, n_kv_heads=2)
        out.update(model_checks(rank, world, group, comm, cfg, False, "model_nosp"))
        out.update(model_checks(rank, world, group, comm, cfg, True, "model_sp"))
        untied = ModelConfig(**base, n_kv_heads=2, tie_embeddings=False)
        out.update(model_checks(rank, world, group, comm, untied, True, "model_sp_untied"))
    else:
        out.update(model_checks(rank, world, group, comm, ModelConfig(**base, n_kv_heads=4), True, "model_sp"))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_pieces_match_dense(world):
    results = run_on_ranks(world, tensor_parallel_checks)
    for rank, out in enumerate(results):
        assert len(out) >= 15
        for name, diff in out.items():
            assert diff < TOL, (world, rank, name, diff)


def test_unsplittable_layouts_are_config_errors():
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, seq_len=8)
    check_tensor_parallel(cfg, 2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="n_kv_heads=2 < parallel.tp=4"):
        check_tensor_parallel(cfg, 4)
    with pytest.raises(ConfigError, match="n_heads=4 is not divisible by parallel.tp=3"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ConfigError, match="ffn_dim=51"):
        check_tensor_parallel(ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=51), 2)
    with pytest.raises(ConfigError, match="sequence"):
        check_tensor_parallel(cfg, 2, sequence_parallel=True, local_seq_len=5)


def test_shard_for_tp_pads_and_slices():
    full = torch.arange(10.0).view(5, 2)
    shards = [shard_for_tp(full, 0, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [3, 3]
    assert torch.equal(torch.cat(shards)[:5], full) and torch.equal(shards[1][-1], torch.zeros(2))
    assert torch.equal(shard_for_tp(full, 1, 1, 2), full[:, 1:])
