"""Per-device memory: model states by ZeRO stage, activations by Korthikanti et al. 2022.

Model states (Rajbhandari et al. 2019): with w, g, o bytes per parameter for weights, gradients
and optimizer state, and Nd-way data-parallel sharding:
    stage 0: (w + g + o) Ψ      stage 1: (w + g) Ψ + o Ψ / Nd
    stage 2: w Ψ + (g + o) Ψ / Nd      stage 3: (w + g + o) Ψ / Nd
Mixed-precision Adam (ZeRO's accounting) is w, g, o = 2, 2, 12; Megatron-LM keeps fp32
gradients (2, 4, 12: the 18 bytes per parameter Korthikanti et al. use); fp32 training 4, 4, 8.

Activations: every tensor a layer keeps for its backward, sorted by whether tensor parallelism
shards it. For a GPT layer this reproduces the paper's s b h (34 + 5 a s / h) and its tp,
sequence-parallel and recompute variants; for Llama layers the same bookkeeping gives SwiGLU /
GQA / flash-attention numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.layouts import Layout, layers_per_stage
from plait.plan.models import ModelSpec


@dataclass(frozen=True)
class Precision:
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float  # bytes per element of saved activations

    @property
    def state_bytes(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


PRECISIONS = {
    "bf16": Precision(2, 2, 12, 2),  # ZeRO paper: bf16 weights and grads, fp32 master + m + v
    "megatron": Precision(2, 4, 12, 2),  # fp32 gradient accumulation buffer
    "fp32": Precision(4, 4, 8, 4),  # plait's fp32 AdamW
}


def model_state_bytes(params: float, shard_ways: int, zero: int, precision: Precision) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state on one device holding `params` (Ψ)."""
    weights = params * precision.weight_bytes
    grads = params * precision.grad_bytes
    optimizer = params * precision.optimizer_bytes
    if zero >= 1:
        optimizer /= shard_ways
    if zero >= 2:
        grads /= shard_ways
    if zero >= 3:
        weights /= shard_ways
    return {"params": weights, "grads": grads, "optimizer": optimizer}


def layer_activation_bytes(model: ModelSpec, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                           recompute: str = "none", cp: int = 1, element_bytes: float = 2.0) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one device."""
    tokens = micro_batch * model.seq_len / cp  # tokens this device holds
    unit = tokens * model.dim  # elements of one hidden-size tensor
    replicated_divisor = tp if sequence_parallel else 1
    if recompute == "full":
        return element_bytes * unit / replicated_divisor  # only the block input is kept
    h = model.dim
    # Inputs of the two norms and of the two column-parallel matmuls: full copies on every tp rank
    # unless sequence parallelism splits them along the sequence.
    replicated = 4 * element_bytes * unit
    if not model.fused_norm:  # each of the two norms also keeps its normalised output
        replicated += 2 * element_bytes * unit
    if model.dropout:
        replicated += 2 * unit  # 1-byte masks after the attention and MLP output projections
    # Q, K, V and the attention output (input of the output projection).
    sharded = element_bytes * unit * (2 * model.q_dim + 2 * model.kv_dim) / h
    # MLP intermediates: GELU keeps fc1's output and its own; SwiGLU keeps gate, up, silu(gate), product.
    mlp_tensors = 4 if model.mlp == "swiglu" else 2
    sharded += element_bytes * unit * mlp_tensors * model.ffn_dim / h * model.experts_per_token
    scores = 0.0
    if not model.flash_attention and recompute != "selective":
        score_elements = model.n_heads * micro_batch * (model.seq_len / cp) * model.seq_len
        # softmax output (+ with dropout: a 1-byte mask and the dropped-out probabilities)
        per_element = element_bytes + (1 + element_bytes if model.dropout else 0)
        scores = score_elements * per_element
    return replicated / replicated_divisor + (sharded + scores) / tp


def in_flight_layer_stacks(layout: Layout, micro_batches: int) -> float:
    """How many micro-batches' worth of a stage's layers the first stage holds at its peak."""
    p = layout.pp
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(micro_batches)
    if layout.schedule == "interleaved":
        return min(micro_batches, p) * (1 + (p - 1) / (p * layout.virtual_stages))
    return float(min(micro_batches, p))  # 1F1B and ZB-H1


def stage_activation_bytes(model: ModelSpec, layout: Layout, micro_batches: int, element_bytes: float,
                           stage: str) -> float:
    """Peak activation bytes of the first or last pipeline stage (the two that differ)."""
    per_layer = layer_activation_bytes(model, layout.micro_batch, layout.tp, layout.sequence_parallel,
                                       layout.recompute, layout.cp, element_bytes)
    layers = layers_per_stage(model, layout)
    stacks = in_flight_layer_stacks(layout, micro_batches) if stage == "first" else 1.0
    total = per_layer * layers * stacks
    tokens = layout.micro_batch * model.seq_len / layout.cp
    split = layout.tp if layout.sequence_parallel else 1
    if stage == "first" and model.dropout:
        total += tokens * model.dim / split * stacks  # embedding dropout mask
    if stage == "last" or layout.pp == 1:
        # final-norm input and head input, plus fp32 logits for the cross-entropy (vocab-parallel)
        total += 2 * element_bytes * tokens * model.dim / split + 4 * tokens * model.vocab_size / layout.tp
    return total


def stage_params(model: ModelSpec, layout: Layout, stage: str) -> float:
    """Parameters one device of the first or last stage holds (experts split over ep, all over tp)."""
    layers = layers_per_stage(model, layout)
    per_layer = model.dense_layer_params() + model.n_experts * model.expert_params() / layout.ep
    params = layers * per_layer
    if stage == "first" or layout.pp == 1:
        params += model.embedding_params()
    if stage == "last" or layout.pp == 1:
        params += model.norm_params() + model.head_params()
        if layout.pp > 1 and model.tie_embeddings:
            params += model.vocab_size * model.dim  # the last stage keeps its own copy of the tied matrix
    return params / layout.tp


def zero3_gather_bytes(model: ModelSpec, layout: Layout, precision: Precision) -> float:
    """ZeRO-3 gathers one layer's weights at a time and prefetches the next: two full layers."""
    if layout.zero < 3:
        return 0.0
    return 2 * model.layer_params() / (layout.tp * layout.ep) * precision.weight_bytes
