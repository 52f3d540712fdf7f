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
GQA / flash-attention numbers, and a fused memory-efficient norm and a fused SwiGLU keep less.

In-flight micro-batches per pipeline rank follow Megatron-LM's schedules (schedules.py of
Megatron-Core): 1F1B rank r runs p - r - 1 warm-up forwards; interleaved rank r runs
2 (p - r - 1) + (v - 1) p, in groups of p micro-batches per model chunk; each rank's chunks
hold the layers plait's partition gives them (the embedding with the first, the head with the
last), so the peak is the largest weighted count over the schedule, rank by rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools

from plait.plan.layouts import Layout, rank_chunk_layers
from plait.plan.models import ModelSpec

# Tokens per chunk of a chunked loss (plait's train.ce_chunk_tokens default).
LOSS_CHUNK_TOKENS = 4096


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


@functools.lru_cache(maxsize=65536)
def layer_activation_bytes(model: ModelSpec, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                           recompute: str = "none", cp: int = 1, element_bytes: float = 2.0) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one device."""
    tokens = micro_batch * model.seq_len / cp  # tokens this device holds
    unit = tokens * model.dim  # elements of one hidden-size tensor
    replicated_divisor = tp if sequence_parallel else 1
    if recompute == "full":
        return element_bytes * unit / replicated_divisor  # only the block input is kept
    h = model.dim
    # Inputs of the two column-parallel matmuls (the norms' outputs): full copies on every tp
    # rank unless sequence parallelism splits them along the sequence (and regathers them).
    replicated = 2 * element_bytes * unit
    if not model.memory_efficient_norm:  # a norm that saves its input keeps one more tensor each
        replicated += 2 * element_bytes * unit
    if not model.fused_norm:  # plain PyTorch norms also keep the normalised output
        replicated += 2 * element_bytes * unit
    if model.dropout:
        replicated += 2 * unit  # 1-byte masks after the attention and MLP output projections
    # Q, K, V and the attention output (input of the output projection); flash attention keeps
    # these (and a per-row log-sum-exp), never the scores.
    sharded = element_bytes * unit * (2 * model.q_dim + 2 * model.kv_dim) / h
    # MLP intermediates: GELU keeps fc1's output and its own; SwiGLU keeps gate, up, silu(gate)
    # and the product, a fused SwiGLU gate and up only.
    if model.mlp == "swiglu":
        mlp_tensors = 2 if model.fused_swiglu else 4
    else:
        mlp_tensors = 2
    sharded += element_bytes * unit * mlp_tensors * model.ffn_dim / h * model.experts_per_token
    scores = 0.0
    if not model.flash_attention and recompute != "selective":
        score_elements = model.n_heads * micro_batch * (model.seq_len / cp) * model.seq_len
        # softmax output (+ with dropout: a 1-byte mask and the dropped-out probabilities)
        per_element = element_bytes + (1 + element_bytes if model.dropout else 0)
        scores = score_elements * per_element
    # Selective recompute with flash attention saves nothing: the recomputed core's inputs
    # (Q, K, V) are its checkpoint, and its output is the output projection's input.
    return replicated / replicated_divisor + (sharded + scores) / tp


@functools.lru_cache(maxsize=65536)
def _peak_chunks_in_flight(schedule: str, p: int, v: int, m: int, rank: int,
                           weights: tuple[float, ...]) -> float:
    """The largest sum of `weights[chunk]` over the micro-batches a rank holds at one time.

    1F1B / ZB-H1: p - rank - 1 warm-up forwards, then one forward and one backward in turn
    (ZB-H1 defers weight gradients but frees activations as 1F1B does). GPipe: all m.
    Interleaved (Megatron-Core's order): forwards walk the chunks in groups of p micro-batches,
    backwards the chunks in reverse; warm-up 2 (p - rank - 1) + (v - 1) p forwards.
    """
    if schedule == "gpipe":
        return m * sum(weights)
    if v == 1:
        return min(m, p - rank) * weights[0]
    total = m * v
    warmup = min(total, 2 * (p - rank - 1) + (v - 1) * p)
    held = peak = 0.0
    forwards = backwards = 0
    def forward() -> None:
        nonlocal held, peak, forwards
        held += weights[(forwards // p) % v]
        forwards += 1
        peak = max(peak, held)
    def backward() -> None:
        nonlocal held, backwards
        held -= weights[v - 1 - (backwards // p) % v]
        backwards += 1
    for _ in range(warmup):
        forward()
    for _ in range(total - warmup):
        forward()
        backward()
    return peak


def in_flight_layer_stacks(layout: Layout, micro_batches: int) -> float:
    """How many micro-batches' worth of a stage's layers the first stage holds at its peak
    (equal chunks): 1F1B and ZB-H1 min(m, p), GPipe m, interleaved min(m, p) (1 + (p-1)/(p v))
    once m >= p (Korthikanti et al.), exactly Megatron's warm-up count for any m."""
    if layout.pp == 1:
        return 1.0
    v = layout.virtual_stages if layout.schedule == "interleaved" else 1
    return _peak_chunks_in_flight(layout.schedule, layout.pp, v, micro_batches, 0, (1.0 / v,) * v)


def activation_terms(model: ModelSpec, layout: Layout, micro_batches: int, element_bytes: float,
                     rank: int) -> dict[str, float]:
    """The terms of pipeline rank `rank`'s peak activation bytes: bytes per layer and
    micro-batch, layer-micro-batches in flight at the peak, the embedding-dropout masks (first
    rank) and the loss (last rank)."""
    per_layer = layer_activation_bytes(model, layout.micro_batch, layout.tp, layout.sequence_parallel,
                                       layout.recompute, layout.cp, element_bytes)
    chunks = rank_chunk_layers(model, layout)[rank]
    v = len(chunks)
    schedule = layout.schedule if layout.pp > 1 else "1f1b"
    layers_held = _peak_chunks_in_flight(schedule, layout.pp, v, micro_batches, rank,
                                         tuple(float(c) for c in chunks))
    tokens = layout.micro_batch * model.seq_len / layout.cp
    split = layout.tp if layout.sequence_parallel else 1
    first, last = rank == 0, rank == layout.pp - 1
    embedding = 0.0
    if first and model.dropout:
        # the embedding-dropout mask of every micro-batch whose first chunk is in flight
        first_chunk = _peak_chunks_in_flight(schedule, layout.pp, v, micro_batches, 0, (1.0,) + (0.0,) * (v - 1))
        embedding = tokens * model.dim / split * first_chunk
    loss = 0.0
    if last:
        # The loss runs once per micro-batch right before its backward: one micro-batch's worth.
        # Final-norm input (none with a memory-efficient norm) and head input.
        hidden = (1 if model.memory_efficient_norm else 2) * element_bytes * tokens * model.dim / split
        # fp32 logits, split over the vocabulary by tp; a chunked loss holds one chunk's
        # logits and their gradient, never the micro-batch's.
        logit_tokens = min(tokens, 2 * LOSS_CHUNK_TOKENS) if model.chunked_loss else tokens
        loss = hidden + 4 * logit_tokens * model.vocab_size / layout.tp
    return {"per_layer": per_layer, "layers_in_flight": layers_held, "layers": per_layer * layers_held,
            "embedding": embedding, "loss": loss}


def rank_activation_bytes(model: ModelSpec, layout: Layout, micro_batches: int, element_bytes: float,
                          rank: int) -> float:
    """Peak activation bytes of pipeline rank `rank`."""
    terms = activation_terms(model, layout, micro_batches, element_bytes, rank)
    return terms["layers"] + terms["embedding"] + terms["loss"]


def _ranks_to_check(pp: int) -> list[int]:
    """The early ranks hold the most micro-batches, the last holds the loss; ranks in between
    hold fewer micro-batches of as many layers, so these bound every rank."""
    return sorted({0, min(1, pp - 1), min(2, pp - 1), pp - 1})


def stage_activation_bytes(model: ModelSpec, layout: Layout, micro_batches: int, element_bytes: float,
                           stage: str) -> float:
    """Peak activation bytes of the first or last pipeline stage ("first", "last"), or of the
    fullest rank ("max")."""
    if stage == "max":
        return max(rank_activation_bytes(model, layout, micro_batches, element_bytes, r)
                   for r in _ranks_to_check(layout.pp))
    return rank_activation_bytes(model, layout, micro_batches, element_bytes, 0 if stage == "first" else layout.pp - 1)


def rank_params(model: ModelSpec, layout: Layout, rank: int) -> float:
    """Parameters one device of pipeline rank `rank` holds (experts split over ep, all over tp)."""
    return _rank_params(model, layout.tp, layout.ep, layout.pp, sum(rank_chunk_layers(model, layout)[rank]), rank)


@functools.lru_cache(maxsize=65536)
def _rank_params(model: ModelSpec, tp: int, ep: int, pp: int, layers: int, rank: int) -> float:
    per_layer = model.dense_layer_params() + model.n_experts * model.expert_params() / ep
    params = layers * per_layer
    if rank == 0:
        params += model.embedding_params()
    if rank == pp - 1:
        params += model.norm_params() + model.head_params()
        if pp > 1 and model.tie_embeddings:
            params += model.vocab_size * model.dim  # the last stage keeps its own copy of the tied matrix
    return params / tp


def stage_params(model: ModelSpec, layout: Layout, stage: str) -> float:
    """Parameters one device of the first, a middle ("mid": the fullest one) or the last stage holds."""
    if stage == "first" or layout.pp == 1 or (stage != "last" and layout.pp == 2):
        return rank_params(model, layout, 0)
    if stage == "last":
        return rank_params(model, layout, layout.pp - 1)
    counts = [sum(c) for c in rank_chunk_layers(model, layout)[1:-1]] or [0]
    return _rank_params(model, layout.tp, layout.ep, layout.pp, max(counts), 1)


def zero3_gather_bytes(model: ModelSpec, layout: Layout, precision: Precision) -> float:
    """ZeRO-3 gathers one layer's weights at a time and prefetches the next: two full layers."""
    if layout.zero < 3:
        return 0.0
    return 2 * model.layer_params() / (layout.tp * layout.ep) * precision.weight_bytes
