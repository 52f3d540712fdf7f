"""Megatron-style tensor parallelism, optionally with sequence parallelism.

`apply_tensor_parallel` is done *to* a built dense Transformer: it swaps its layers for
sharded ones in place and keeps every parameter name, so `blocks.0.attn.wq.weight` holds
this rank's shard of the dense `blocks.0.attn.wq.weight`. Each sharded parameter records
the dim it is split on and the full shape (`_tp_dim`, `_tp_full_shape`), which is all that
checkpoints need: `gather_full` rebuilds the full tensor, `shard_for_tp` cuts it again.

Layout: attention projections q/k/v column-parallel by head and wo row-parallel; MLP
gate/up column-parallel and down row-parallel; embedding and LM head split over the
vocabulary, padded to a multiple of tp (the padded rows are zero, never looked up, and
masked out of the loss). Norms enter the tensor-parallel region once for all the
column-parallel layers they feed, so each block communicates twice forward and twice
backward. With sequence parallelism norms and residuals hold 1/tp of the sequence, and
each norm's weight gradient covers only the local tokens, so the norm sums it over tp
inside backward and every parameter leaves backward with its whole gradient.

The model's output is this rank's slice of the logits (vocabulary positions
rank*V_local ... (rank+1)*V_local); `vocab_parallel_cross_entropy` takes the loss from it
without ever gathering the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.comm import Comm, Group
from plait.config import ModelConfig
from plait.errors import ConfigError
from plait.layout.tensor import tensor_parallel_problem
from plait.model.init import init_tensor
from plait.model.llama import RMSNorm, Transformer
from plait.parallel.tensor_comm import TAG, copy_to_tp, enter_tp_region, gather_along, leave_tp_region


@dataclass(frozen=True)
class TensorShard:
    """Where a parameter's full tensor is split: along `dim`, full shape `full_shape`."""

    dim: int
    full_shape: tuple[int, ...]


def padded_size(size: int, parts: int) -> int:
    return -(-size // parts) * parts


def shard_for_tp(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank's contiguous 1/size slice of `full` along `dim`. A length not divisible by size
    (the vocabulary) is padded with zeros at the end first, so the last ranks hold the padding."""
    length = full.shape[dim]
    padded = padded_size(length, size)
    if padded != length:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - length
        full = torch.cat([full, full.new_zeros(pad_shape)], dim)
    part = padded // size
    return full.narrow(dim, rank * part, part).clone()


def gather_full(shard: torch.Tensor, shard_info: TensorShard, group: Group, comm: Comm, tag: str = "state") -> torch.Tensor:
    """The full tensor from every rank's shard (collective over tp), padding removed."""
    full = gather_along(shard.detach(), shard_info.dim, group, comm, tag=tag)
    return full.narrow(shard_info.dim, 0, shard_info.full_shape[shard_info.dim]).contiguous()


def _mark_sharded(param: nn.Parameter, dim: int, full_shape: tuple[int, ...]) -> nn.Parameter:
    param._tp_dim = dim
    param._tp_full_shape = tuple(full_shape)
    return param


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ restricted to this rank's rows of W [out, in] (its share of the outputs).

    The input enters the tensor-parallel region here unless `enter_region` is False, which
    means a shared predecessor (ParallelRegionNorm) did it once for several layers.
    `out_features` not divisible by tp is padded (the LM head's vocabulary).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, comm: Comm,
                 sequence_parallel: bool = False, enter_region: bool = True):
        super().__init__()
        self.group, self.comm = group, comm
        self.sequence_parallel, self.enter_region = sequence_parallel, enter_region
        local = padded_size(out_features, group.size) // group.size
        self.weight = _mark_sharded(nn.Parameter(torch.empty(local, in_features)), 0, (out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter_region:
            x = enter_tp_region(x, self.group, self.comm, self.sequence_parallel)
        regather = getattr(x, "sp_regather", None)
        if regather is not None and torch.is_grad_enabled():
            return _LinearOfGathered.apply(x, self.weight, x.sp_local, regather)
        return F.linear(x, self.weight)


class _LinearOfGathered(torch.autograd.Function):
    """x_full Wᵀ where x_full was gathered over the sequence: saves the local slice, not
    x_full, and re-gathers it (once for all its readers) to form W's gradient."""

    @staticmethod
    def forward(ctx, x_full: torch.Tensor, weight: torch.Tensor, local: torch.Tensor, regather):
        ctx.save_for_backward(local, weight)
        ctx.regather = regather
        regather.users += 1
        return F.linear(x_full, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        local, weight = ctx.saved_tensors
        x_full = ctx.regather.full(local)
        grad_input = grad_out @ weight
        grad_weight = grad_out.flatten(0, -2).t() @ x_full.flatten(0, -2).to(grad_out.dtype)
        ctx.regather.release()
        return grad_input, grad_weight, None, None


class RowParallelLinear(nn.Module):
    """y = x_r W_rᵀ summed over ranks: W [out, in] split along its inputs, x already split
    the same way (the output of a column-parallel layer). The sum is an all-reduce, or a
    reduce-scatter over the sequence under sequence parallelism."""

    def __init__(self, in_features: int, out_features: int, group: Group, comm: Comm,
                 sequence_parallel: bool = False):
        super().__init__()
        if in_features % group.size:
            raise ValueError(f"in_features {in_features} is not divisible by tp {group.size}")
        self.group, self.comm, self.sequence_parallel = group, comm, sequence_parallel
        local = in_features // group.size
        self.weight = _mark_sharded(nn.Parameter(torch.empty(out_features, local)), 1, (out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_tp_region(F.linear(x, self.weight), self.group, self.comm, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary, padded to a multiple of tp) are split over tp.
    Each rank looks up the tokens it owns, zeros elsewhere; the sum over ranks is the lookup."""

    def __init__(self, num_embeddings: int, dim: int, group: Group, comm: Comm, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.comm, self.sequence_parallel = group, comm, sequence_parallel
        self.local_rows = padded_size(num_embeddings, group.size) // group.size
        self.vocab_start = group.rank * self.local_rows
        self.weight = _mark_sharded(nn.Parameter(torch.empty(self.local_rows, dim)), 0, (num_embeddings, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.local_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(out, self.group, self.comm, self.sequence_parallel)


class ParallelRegionNorm(RMSNorm):
    """RMSNorm whose output enters the tensor-parallel region, once for all the
    column-parallel layers it feeds (q/k/v, gate/up, the LM head)."""

    def __init__(self, dim: int, eps: float, group: Group, comm: Comm, sequence_parallel: bool):
        super().__init__(dim, eps)
        self.group, self.comm, self.sequence_parallel = group, comm, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel and self.group.size > 1:
            # Each rank normalises its own part of the sequence, so its weight gradient
            # covers only those tokens; summing it over tp inside backward makes the
            # gradient whole on every rank, like any replicated parameter's.
            weight = copy_to_tp(weight, self.group, self.comm)
        return enter_tp_region(self.norm(x, weight, self.eps), self.group, self.comm, self.sequence_parallel)


def check_tensor_parallel(cfg: ModelConfig, tp: int, sequence_parallel: bool = False, local_seq_len: int | None = None) -> None:
    """Reject layouts tensor parallelism cannot split, naming the field (the layout rule)."""
    seq = cfg.seq_len if local_seq_len is None else local_seq_len
    reason = tensor_parallel_problem(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, seq, tp, sequence_parallel)
    if reason is not None:
        raise ConfigError(reason)


def _swap_norm(norm: RMSNorm, group: Group, comm: Comm, sequence_parallel: bool) -> ParallelRegionNorm:
    new = ParallelRegionNorm(norm.weight.shape[0], norm.eps, group, comm, sequence_parallel)
    new.to(device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight)
    return new


@torch.no_grad()
def apply_tensor_parallel(model: Transformer, group: Group, comm: Comm, sequence_parallel: bool,
                          seed: int | None) -> dict[str, TensorShard]:
    """Shard a built dense model over `group` in place; returns {parameter name: TensorShard}.

    seed: sharded parameters become the slice of init_tensor(seed, name, full_shape) (the
    layout-invariant init); None: the slice of the dense model's current values (loading).
    """
    cfg = model.cfg
    check_tensor_parallel(cfg, group.size, sequence_parallel)
    dense = {name: p.detach() for name, p in model.named_parameters()}
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    head_dim = cfg.dim // cfg.n_heads
    args = (group, comm, sequence_parallel)
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.n_heads, attn.n_kv_heads = cfg.n_heads // group.size, cfg.n_kv_heads // group.size
        attn.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * head_dim, *args, enter_region=False)
        attn.wk = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * head_dim, *args, enter_region=False)
        attn.wv = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * head_dim, *args, enter_region=False)
        attn.wo = RowParallelLinear(cfg.n_heads * head_dim, cfg.dim, *args)
        block.attn_norm = _swap_norm(block.attn_norm, *args)
        if getattr(block, "is_moe", False):
            continue  # experts are not tensor-parallel (etp = 1): the MoE keeps its local tokens (folding.py)
        mlp.w_gate = ColumnParallelLinear(cfg.dim, cfg.ffn_dim, *args, enter_region=False)
        mlp.w_up = ColumnParallelLinear(cfg.dim, cfg.ffn_dim, *args, enter_region=False)
        mlp.w_down = RowParallelLinear(cfg.ffn_dim, cfg.dim, *args)
        block.mlp_norm = _swap_norm(block.mlp_norm, *args)
    model.norm = _swap_norm(model.norm, *args)
    model.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, *args)
    model.lm_head = ColumnParallelLinear(cfg.dim, cfg.vocab_size, *args, enter_region=False)
    if cfg.tie_embeddings:  # both are [V_local, dim] slices of the same rows
        model.lm_head.weight = model.embed.weight
    model.to(device=device, dtype=dtype)
    shards: dict[str, TensorShard] = {}
    for name, param in model.named_parameters():
        if not hasattr(param, "_tp_dim"):
            continue
        info = TensorShard(param._tp_dim, param._tp_full_shape)
        full = dense[name] if seed is None else init_tensor(seed, name, info.full_shape, cfg)
        param.copy_(shard_for_tp(full, info.dim, group.rank, group.size).to(param.device, param.dtype))
        shards[name] = info
    return shards


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, comm: Comm, vocab_size: int):
        local_vocab = logits.shape[-1]
        start = group.rank * local_vocab
        logits32 = logits.float()
        padding = torch.arange(start, start + local_vocab, device=logits.device) >= vocab_size
        logits32 = logits32.masked_fill(padding, float("-inf"))  # padded columns are not tokens
        # Only [tokens] floats cross the wire: the max, then the sum of exps and the target logit.
        global_max = logits32.max(-1).values
        comm.all_reduce(global_max, group, op=dist.ReduceOp.MAX, tag=TAG)
        exp = (logits32 - global_max.unsqueeze(-1)).exp()
        local_target = targets - start
        owned = (local_target >= 0) & (local_target < local_vocab)
        index = local_target.masked_fill(~owned, 0).unsqueeze(-1)
        target_logit = (logits32.gather(-1, index).squeeze(-1) - global_max).masked_fill(~owned, 0.0)
        sums = torch.stack([exp.sum(-1), target_logit])
        comm.all_reduce(sums, group, tag=TAG)
        sum_exp, target_logit = sums[0], sums[1]
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, index, owned)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, index, owned = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the owning rank.
        grad = softmax.scatter_add(-1, index, -owned.to(softmax.dtype).unsqueeze(-1))
        grad = grad * grad_loss.unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group: Group, comm: Comm,
                                 vocab_size: int) -> torch.Tensor:
    """Per-token loss (shape of targets, fp32) from this rank's vocabulary slice of the
    logits [..., V_local]; the same on every tp rank. `vocab_size` is the unpadded size."""
    if group.size == 1:
        return F.cross_entropy(local_logits[..., :vocab_size].flatten(0, -2).float(), targets.flatten(),
                               reduction="none").view(targets.shape)
    return _VocabParallelCrossEntropy.apply(local_logits, targets, group, comm, vocab_size)


@torch.no_grad()
def gather_vocab_logits(local_logits: torch.Tensor, group: Group, comm: Comm, vocab_size: int) -> torch.Tensor:
    """Full logits [..., vocab_size] for sampling (not differentiable; costs the full vocabulary)."""
    full = gather_along(local_logits, local_logits.dim() - 1, group, comm, tag="bookkeeping")
    return full[..., :vocab_size]
