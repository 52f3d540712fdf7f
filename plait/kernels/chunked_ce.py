"""LM head + cross-entropy without materialising the logits of the whole batch.

`chunked_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(hidden @ weight.T, targets, reduction="sum")` (upcast to fp32 as autocast
does), but walks the tokens in chunks: each chunk's logits [chunk, V] are computed by one
matmul in the input dtype, log-softmaxed in fp32, and turned at once into that chunk's
share of grad_hidden and grad_weight (for an upstream gradient of 1), then dropped. Backward
only scales the two stored gradients by the upstream one. So the logits are computed once
(recomputing them in backward would cost a third more LM-head FLOPs) and the peak extra
memory is O(chunk x V) plus the gradients themselves, rather than O(N x V). For the
Llama-1.36B shape (8 x 2048 tokens, V = 32000) the full fp32 logits would be 2.1 GB, plus as
much again for their gradient; a 4096-token chunk is 0.5 GB. Without grad mode (evaluation)
no gradient is made.

Dtypes: the matmuls run in hidden's dtype (bf16 tensor cores on GPU; an fp32 weight is
cast to it), the softmax and the loss in fp32, grad_weight is accumulated in fp32 across
chunks, and each gradient comes back in its input's dtype. Autocast is off inside.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """fp32 logits of one chunk; the matmul runs in hidden's dtype (weight is cast to it)."""
    return (hidden @ weight.t()).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                with_grads: bool) -> Tensor:
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)  # an fp32 master weight under bf16 hidden: one [V, d] copy
        need_h, need_w = with_grads and ctx.needs_input_grad[0], with_grads and ctx.needs_input_grad[1]
        # The gradients for an upstream gradient of 1, made while each chunk's logits exist:
        # backward then only scales them, and the logits are never computed twice.
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, t = hidden[start:end], targets[start:end]
            logits = _chunk_logits(h, w)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - target_logit, 0.0).sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = softmax(logits) - onehot(target), zero on ignored tokens.
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits[torch.arange(end - start, device=h.device), safe_t] -= 1.0
            grad_logits *= valid.unsqueeze(1)
            g = grad_logits.to(hidden.dtype)
            del logits, grad_logits
            if need_h:
                grad_hidden[start:end] = g @ w
            if need_w:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(*(x for x in (grad_hidden, grad_weight) if x is not None))
        ctx.need_h, ctx.need_w, ctx.weight_dtype = need_h, need_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        grad_hidden = grad_weight = None
        if ctx.need_h:
            grad_hidden = saved.pop(0) * grad_out  # a 0-dim scale keeps hidden's dtype
        if ctx.need_w:
            grad_weight = (saved.pop(0) * grad_out.float()).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096,
                          ignore_index: int = -100) -> Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), as an fp32 scalar.

    hidden [N, d], weight [V, d] (the LM head), targets [N] of class indices; tokens whose
    target is `ignore_index` contribute nothing. Divide by the token count for a mean.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, d] and [V, d]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    # Autocast is switched off inside: the dtypes are the ones given (cast hidden to bf16 for
    # bf16 matmuls), and forward and the backward recomputation then agree exactly.
    with torch.autocast(hidden.device.type, enabled=False):
        with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, with_grads)
