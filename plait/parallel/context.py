"""Context parallelism: every cp rank holds part of every sequence; attention is ring attention.

Load balancing: the sequence is cut into 2·cp chunks and rank i holds chunks i and
2cp-1-i, so under the causal mask every rank has the same amount of attention work.
Rotary embeddings use the global positions of the tokens a rank holds (`split_for_cp`).

Ring attention: key/value blocks travel around the cp ring point-to-point. At step t rank
r holds the block of rank src = r - t; the transfer of the next block is posted before the
attention on the current one is computed, so communication hides behind compute. Partial
results are merged with the log-sum-exp (online softmax) rule. With the zigzag layout a
step needs one of three block shapes (derived from chunk order, see `_step_blocks`):
  src == r: the local causal mask over both chunks;
  src <  r: all local queries attend, unmasked, to src's first chunk only;
  src >  r: only the local second chunk attends, unmasked, to both of src's chunks.
Backward is a ring too: the key/value blocks travel again, together with accumulators of
their gradients, which arrive back at their owner after cp hops.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from plait.comm import Comm, Group

TAG = "cp"
_KV_MESSAGE, _GRAD_MESSAGE = 1, 2  # concurrent ring exchanges between the same pair of ranks


def cp_positions(seq_len: int, cp_rank: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of the tokens cp rank `cp_rank` holds: chunks cp_rank and 2cp-1-cp_rank."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    first, second = cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def split_for_cp(tokens: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of `tokens` (or targets) along the sequence dim, and its global positions."""
    positions = cp_positions(tokens.shape[dim], cp_rank, cp, tokens.device)
    return tokens.index_select(dim, positions), positions


def _step_blocks(rank: int, src: int, length: int) -> tuple[slice, slice, bool]:
    """(query rows, key/value rows, causal) of the work at the ring step holding src's block."""
    half = length // 2
    if src == rank:
        return slice(0, length), slice(0, length), True
    if src < rank:  # src's first chunk precedes both of ours; its second follows both
        return slice(0, length), slice(0, half), False
    return slice(half, length), slice(0, length), False  # both of src's chunks precede our second only


def _expand_heads(x: torch.Tensor, repeat: int) -> torch.Tensor:
    # GQA: query head h uses kv head h // repeat, as scaled_dot_product_attention(enable_gqa).
    return x if repeat == 1 else x.repeat_interleave(repeat, dim=1)


def _sum_heads(grad: torch.Tensor, repeat: int) -> torch.Tensor:
    if repeat == 1:
        return grad
    b, heads, length, dim = grad.shape
    return grad.view(b, heads // repeat, repeat, length, dim).sum(2)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def _block_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block (fp32) and the log-sum-exp of its scores per query."""
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def _block_backward(q, k, v, dout, lse, delta, scale: float, causal: bool):
    """Gradients of one block given the *final* log-sum-exp (the FlashAttention backward):
    the probabilities are recomputed, never stored."""
    probs = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ dout
    dscores = probs * (dout @ v.transpose(-1, -2) - delta.unsqueeze(-1))
    return (dscores @ k) * scale, (dscores.transpose(-1, -2) @ q) * scale, dv


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Online softmax: fold a block's normalised result into the running one, in place."""
    old_lse = lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, block_lse)
    out[:, :, rows] = (out[:, :, rows] * torch.exp(old_lse - new_lse).unsqueeze(-1)
                       + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse[:, :, rows] = new_lse


def _pass_on(tensor: torch.Tensor, group: Group, comm: Comm, message: int):
    """Post: send `tensor` to the next rank of the ring, receive the previous rank's."""
    incoming = torch.empty_like(tensor)
    handle = comm.send_recv_async(tensor, (group.rank + 1) % group.size, incoming,
                                  (group.rank - 1) % group.size, group, tag=TAG, message_tag=message)
    return handle, incoming


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
        batch, heads, length, head_dim = q.shape
        repeat, scale = heads // k.shape[1], head_dim ** -0.5
        q32 = q.float()
        out = torch.zeros_like(q32)
        lse = torch.full((batch, heads, length), float("-inf"), device=q.device)
        kv = torch.stack([k, v]).float()  # one message per step instead of two
        for step in range(group.size):
            last = step == group.size - 1
            if not last:
                handle, next_kv = _pass_on(kv, group, comm, _KV_MESSAGE)
            rows, cols, causal = _step_blocks(group.rank, (group.rank - step) % group.size, length)
            k_block, v_block = _expand_heads(kv[0][:, :, cols], repeat), _expand_heads(kv[1][:, :, cols], repeat)
            block_out, block_lse = _block_forward(q32[:, :, rows], k_block, v_block, scale, causal)
            _merge(out, lse, rows, block_out, block_lse)
            if not last:
                handle.wait()
                kv = next_kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.comm = group, comm
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, comm = ctx.group, ctx.comm
        length, repeat, scale = q.shape[2], q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
        q32, dout32 = q.float(), dout.float()
        delta = (dout32 * out).sum(-1)  # rowsum(dO * O), the softmax backward's correction term
        dq = torch.zeros_like(q32)
        kv = torch.stack([k, v]).float()
        grad_handle = grad_incoming = None
        for step in range(group.size):
            last = step == group.size - 1
            if not last:
                kv_handle, next_kv = _pass_on(kv, group, comm, _KV_MESSAGE)
            rows, cols, causal = _step_blocks(group.rank, (group.rank - step) % group.size, length)
            k_block, v_block = _expand_heads(kv[0][:, :, cols], repeat), _expand_heads(kv[1][:, :, cols], repeat)
            dq_block, dk_block, dv_block = _block_backward(
                q32[:, :, rows], k_block, v_block, dout32[:, :, rows], lse[:, :, rows], delta[:, :, rows], scale, causal)
            dq[:, :, rows] += dq_block
            dkv = torch.zeros_like(kv)
            dkv[0][:, :, cols] = _sum_heads(dk_block, repeat)
            dkv[1][:, :, cols] = _sum_heads(dv_block, repeat)
            if grad_handle is not None:  # the accumulator of the block we hold, from the previous rank
                grad_handle.wait()
                dkv += grad_incoming
            # Passed on after every step, the accumulator reaches the block's owner after cp hops.
            grad_handle, grad_incoming = _pass_on(dkv, group, comm, _GRAD_MESSAGE)
            if not last:
                kv_handle.wait()
                kv = next_kv
        grad_handle.wait()
        return dq.to(q.dtype), grad_incoming[0].to(k.dtype), grad_incoming[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    """Causal attention of the zigzag-split sequence over the cp `group`.

    q [batch, heads, local_seq, head_dim]; k, v [batch, kv_heads, local_seq, head_dim] with
    heads a multiple of kv_heads (GQA); local_seq = the two chunks from `split_for_cp`.
    """
    if q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is not two equal chunks")
    return RingAttention.apply(q, k, v, group, comm)


def apply_context_parallel(model: nn.Module, group: Group, comm: Comm) -> None:
    """Make every attention's core ring attention over `group` (in place; names unchanged).
    The model must then be called with split_for_cp's tokens and positions, and parameter
    gradients summed over the cp group (like data parallel ones)."""
    for block in model.blocks:
        block.attn.core = functools.partial(ring_attention, group=group, comm=comm)
