"""Text generation from a trained model: temperature and top-k sampling, seeded."""

from __future__ import annotations

import torch
from torch import nn

from plait.data import Tokenizer


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, n_tokens: int, context: int,
    seed: int = 0, temperature: float = 0.8, top_k: int = 40, device: torch.device | str = "cpu",
) -> str:
    """Continue `prompt` by `n_tokens` tokens; returns prompt + continuation as text.

    No KV cache: each new token re-reads up to `context` tokens, which is plenty fast for
    a sample at the end of a run and keeps the model code free of inference paths.
    """
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) or [0]
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(n_tokens):
        logits = model(tokens[:, -context:])[0, -1].float()
        logits[tokenizer.vocab_size:] = float("-inf")  # padded vocabulary rows are never sampled
        if temperature <= 0:
            next_id = logits.argmax()
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[0]
        tokens = torch.cat([tokens, next_id.view(1, 1)], dim=1)
    model.train(was_training)
    return tokenizer.decode(tokens[0].tolist())
