"""A Llama-style decoder in plain PyTorch, with no parallel code in it.

Token embedding, pre-norm blocks of grouped-query attention (through
scaled_dot_product_attention) and a SwiGLU MLP, RMSNorm, rotary position embeddings,
and an optional LM head tied to the embedding. Parameter names follow the module tree
(`blocks.3.attn.wq.weight`), which is what initialisation and checkpoints key on.
Rotary embeddings rotate the two halves of each head (the Hugging Face convention), so
exported weights need no permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import ModelConfig
# swiglu is not used here; it stays importable from this module next to rms_norm and
# apply_rotary, the other reference functions of the decoder.
from plait.model.mlp import SwiGLU, swiglu  # noqa: F401
from plait.model.moe import MoE


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension."""
    # Normalise in fp32 even for bf16 inputs: the mean of squares loses too much in bf16.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    # The function that does the work; plait.kernels swaps in a fused one per instance.
    norm = staticmethod(rms_norm)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps)


def rotary_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [len(positions), head_dim] for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    rotary = staticmethod(apply_rotary)  # plait.kernels swaps in a fused one per instance

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # The sequence length is read from the projections, not from x: under sequence
        # parallelism x holds a slice of the sequence and the projections gather all of it.
        q = self.wq(x)
        seq = q.shape[1]
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [batch, heads, seq, head_dim] over k, v (fewer heads under GQA).

        A method of its own so that parallel code can swap it (ring attention) or
        recompute just it (selective recomputation) without touching the projections.
        """
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = moe
        if moe:
            self.mlp = MoE(cfg.dim, cfg.moe_ffn_dim or cfg.ffn_dim, cfg.n_experts, cfg.top_k,
                           cfg.n_shared_experts, cfg.router, cfg.capacity_factor)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.is_moe:  # the router's statistics stay on the layer (MoE.last_stats) for the losses
            out, _ = self.mlp(self.mlp_norm(x))
            return x + out
        return x + self.mlp(self.mlp_norm(x))


def is_moe_block(cfg: ModelConfig, index: int) -> bool:
    """Whether block `index` (from 0) has an MoE MLP: every moe_every-th block, counting from 1."""
    return cfg.n_experts > 0 and (index + 1) % cfg.moe_every == 0


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, is_moe_block(cfg, i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] for tokens [batch, seq]; positions default to 0..seq-1."""
        return self.lm_head(self.hidden(tokens, positions))

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states [batch, seq, dim]: everything but the LM head,
        for a loss that applies the head itself (plait.kernels.chunked_ce)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rotary_tables(self.cfg.dim // self.cfg.n_heads, positions, self.cfg.rope_theta)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())
