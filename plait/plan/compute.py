"""Compute time of one layer on one device: matmuls at a shape-dependent efficiency plus
memory-bound element-wise work at a fraction of HBM bandwidth.

A matmul of (m x k) by (k x n) runs at peak x ceiling x f(m) f(n) f(k), f(d) = d / (d + d_half):
small dimensions leave tiles partly empty, leave SMs idle in the last wave, and amortise each
tile's prologue and epilogue over few k steps. `ceiling` is the best a large bf16 matmul
reaches (about 0.78 of the datasheet on an H200 measured with PyTorch, REFERENCES.md), and
`d_half` the size at which one dimension alone halves it. Fused (flash) attention is its own
kernel with its own ceiling: FlashAttention-2 (PyTorch SDPA's flash backend) reaches about 0.30
of an H100's peak on long sequences (head dim 128, causal; Dao 2023, Shah et al. 2024), less
on short ones, `attention_efficiency x s / (s + s_half)`; its backward recomputes the scores,
2.5 x the forward's FLOPs instead of 2 x. Norms, residual adds, activation
functions, rotary embeddings, dropout and (without flash attention) the softmax over the
s x s scores are limited by memory bandwidth: they move a counted number of bytes at
`hbm_efficiency` x the datasheet HBM bandwidth. The backward pass costs twice the forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from plait.plan.cluster import Cluster
from plait.plan.models import ModelSpec


@dataclass(frozen=True)
class Efficiency:
    gemm_ceiling: float = 0.80
    gemm_half_dim: float = 96.0
    hbm_efficiency: float = 0.80
    # Fixed cost of launching one kernel (CUDA launch + framework dispatch); it dominates tiny models.
    kernel_launch_s: float = 5e-6
    # Fused attention: fraction of peak on its executed (causal-halved) FLOPs for long
    # sequences, and the query length at which that halves.
    attention_efficiency: float = 0.30
    attention_half_seq: float = 500.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# Measured per device: what a training step's matmuls reach, not one isolated large matmul.
# H200 (and the H100 SXM, the same chip and clocks): fitted to plait's measured single-H200
# steps (docs/plan.md: llama-1b at micro-batch 8 and 16, gpt2-124m at 32; torch.compile, SDPA,
# fused AdamW); a lone 8192^3 bf16 matmul reaches 0.78-0.79 there, a whole step's matmuls
# (k = 768..5632, back to back, under the board's power limit) about 0.71. Other devices keep
# the A100 figure that reproduces Megatron-LM 2021's Table 1.
DEVICE_EFFICIENCY: dict[str, Efficiency] = {
    "h200": Efficiency(gemm_ceiling=0.71),
    "h100-sxm": Efficiency(gemm_ceiling=0.71),
}


def efficiency_for(cluster: Cluster) -> Efficiency:
    """The device's measured efficiencies, with the cluster file's own overrides on top."""
    base = DEVICE_EFFICIENCY.get(cluster.accelerator, Efficiency())
    return dataclasses.replace(base, **dict(cluster.efficiency)) if cluster.efficiency else base


# Kernels in one layer's forward: 2 norms, 4 (GPT: 3) matmul launches, attention (1 fused or 3
# unfused: QK^T, softmax, AV), rotary (2) or dropout (2), activation, 2 residual adds.
KERNELS_PER_LAYER_FORWARD = 14


def gemm_efficiency(m: float, n: float, k: float, eff: Efficiency) -> float:
    d = eff.gemm_half_dim
    return eff.gemm_ceiling * (m / (m + d)) * (n / (n + d)) * (k / (k + d))


def gemm_time(m: float, n: float, k: float, peak: float, eff: Efficiency) -> float:
    return 2.0 * m * n * k / (peak * gemm_efficiency(m, n, k, eff))


@dataclass(frozen=True)
class LayerTimes:
    """Seconds for one layer and one micro-batch on one device."""
    forward: float
    backward: float
    recompute: float
    attention_forward: float  # the part of `forward` that attention scores take (cp overlap window)

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def _elementwise_forward_bytes(model: ModelSpec, tokens: float, tp: int, sp: bool, element_bytes: float) -> float:
    """Bytes read and written by one layer's memory-bound forward ops (not the matmuls)."""
    unit = tokens * model.dim
    # Each norm reads and writes a hidden tensor; each residual add (+ bias + dropout) reads two, writes one.
    replicated = element_bytes * unit * (2 * 2 + 2 * 3) + (2 * unit if model.dropout else 0)
    if model.mlp == "swiglu":
        sharded = element_bytes * tokens * model.ffn_dim * 5  # silu (read, write), mul (read 2, write)
    else:
        sharded = element_bytes * tokens * model.ffn_dim * 2  # bias + gelu fused: read, write
    sharded *= model.experts_per_token
    if not model.biases:  # rotary embeddings on Q and K (Llama); GPT uses learned positions
        sharded += element_bytes * tokens * (model.q_dim + model.kv_dim) * 2
    return replicated / (tp if sp else 1) + sharded / tp


def _score_bytes(model: ModelSpec, tokens: float, tp: int) -> float:
    """Unfused attention: the s x s scores are written by QK^T, softmaxed, dropped out, read by AV."""
    if model.flash_attention:
        return 0.0
    elements = tokens * model.seq_len * model.n_heads / tp
    passes = 4 + (2.5 if model.dropout else 0)  # QK^T write, softmax read + write, AV read; dropout r/w/mask
    return elements * passes * 2


def layer_times(model: ModelSpec, micro_batch: int, tp: int, cp: int, sp: bool, recompute: str,
                cluster: Cluster, eff: Efficiency, element_bytes: float = 2.0) -> LayerTimes:
    peak, hbm = cluster.peak_flops, cluster.hbm_bw * eff.hbm_efficiency
    tokens = micro_batch * model.seq_len / cp
    h, f = model.dim, model.ffn_dim
    qkv = gemm_time(tokens, (model.q_dim + 2 * model.kv_dim) / tp, h, peak, eff)
    out_proj = gemm_time(tokens, h, model.q_dim / tp, peak, eff)
    routed_tokens = tokens * model.experts_per_token
    per_expert_tokens = routed_tokens / model.n_experts if model.n_experts > 1 else tokens
    up = gemm_time(per_expert_tokens, (model.mlp_matrices - 1) * f / tp, h, peak, eff)
    down = gemm_time(per_expert_tokens, h, f / tp, peak, eff)
    mlp = (up + down) * routed_tokens / per_expert_tokens
    # Attention scores: per head, (s_q x d_head) by (d_head x s_kv) and back. Flash attention on a
    # causal mask skips the blocks above the diagonal, so it does half the counted work, in one
    # fused kernel at its own efficiency; unfused scores are two batched matmuls.
    heads = model.n_heads / tp * micro_batch
    s_q, s_kv, d_head = model.seq_len / cp, model.seq_len, model.head_dim
    if model.flash_attention:
        flops = heads * 4 * s_q * s_kv * d_head * 0.5
        scores = flops / (peak * eff.attention_efficiency * s_q / (s_q + eff.attention_half_seq))
        scores_backward = 2.5 * scores  # the backward recomputes the scores (FlashAttention-2)
    else:
        scores = heads * (gemm_time(s_q, s_kv, d_head, peak, eff) + gemm_time(s_q, d_head, s_kv, peak, eff))
        scores_backward = 2 * scores
    score_memory = _score_bytes(model, tokens, tp) / hbm
    elementwise = _elementwise_forward_bytes(model, tokens, tp, sp, element_bytes) / hbm
    launches = KERNELS_PER_LAYER_FORWARD * eff.kernel_launch_s
    rest = qkv + out_proj + mlp + score_memory + elementwise + launches
    forward = rest + scores
    backward = 2 * rest + scores_backward
    extra = {"none": 0.0, "selective": scores + score_memory, "full": forward}[recompute]
    return LayerTimes(forward=forward, backward=backward, recompute=extra,
                      attention_forward=scores + score_memory)


def head_time(model: ModelSpec, micro_batch: int, tp: int, cp: int, cluster: Cluster, eff: Efficiency) -> float:
    """Forward + backward of the LM head and the fp32 cross-entropy for one micro-batch."""
    tokens = micro_batch * model.seq_len / cp
    matmul = gemm_time(tokens, model.vocab_size / tp, model.dim, cluster.peak_flops, eff)
    logits_bytes = 4 * tokens * model.vocab_size / tp * 3  # write, read for the loss, write its gradient
    return 3 * matmul + logits_bytes / (cluster.hbm_bw * eff.hbm_efficiency)


def optimizer_step_time(local_params: float, cluster: Cluster, eff: Efficiency) -> float:
    """AdamW reads and writes fp32 master weights, m and v, reads a gradient, writes a bf16 copy."""
    return local_params * 30 / (cluster.hbm_bw * eff.hbm_efficiency)
