"""Hand-written kernels for the single-device hot path (plain PyTorch, no custom CUDA).

`chunked_ce.chunked_cross_entropy` fuses the LM head with the cross-entropy loss chunk by
chunk of tokens, so the [tokens, vocab] fp32 logits of a whole batch never exist at once.
"""

from plait.kernels.chunked_ce import chunked_cross_entropy

__all__ = ["chunked_cross_entropy"]
