"""Evaluate one layout: does it fit, how long is a step, where does the time go.

Step time = m x t_stage + bubble + exposed pipeline, data-parallel and optimizer time, where
t_stage is one micro-batch's forward + backward (+ recompute) on the slowest pipeline stage,
including tensor-, context- and expert-parallel communication that nothing hides.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field

from plait.config import accumulation_steps, validate
from plait.layout import batch
from plait.layout.pipeline import canonical_schedule
from plait.parallel.partition import head_cost_in_layers, partition_layers, rank_chunks
from plait.plan import comm_model as comm
from plait.plan import memory as mem
from plait.plan.cluster import GB, Cluster
from plait.plan.comm_model import NetworkEfficiency
from plait.plan.compute import Efficiency, LayerTimes, efficiency_for, head_time, layer_times, optimizer_step_time
from plait.plan.layouts import Layout, check_layout, rank_chunk_layers
from plait.plan.models import ModelSpec, from_plait_model

BUBBLE_FACTOR = {"1f1b": 1.0, "gpipe": 1.0, "zb": 1 / 3}  # x (p - 1) stage times; interleaved: 1/v


@dataclass(frozen=True)
class Assumptions:
    """Everything that is not the model, the cluster or the layout."""
    precision: mem.Precision = mem.PRECISIONS["bf16"]
    efficiency: Efficiency | None = None  # None: the device's measured ones (compute.efficiency_for)
    network: NetworkEfficiency = NetworkEfficiency()


@dataclass
class Estimate:
    layout: Layout
    fits: bool
    why: str | None = None
    step_time_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    memory_bytes: dict[str, float] = field(default_factory=dict)
    time_s: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, float | int | str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "layout": self.layout.to_dict(), "fits": self.fits, "why": self.why,
            "step_time_s": self.step_time_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
            "memory_bytes": self.memory_bytes, "time_s": self.time_s, "inputs": self.inputs,
        }


_layer_times = functools.lru_cache(maxsize=4096)(layer_times)


def memory_breakdown(model: ModelSpec, layout: Layout, micro_batches: int, cluster: Cluster,
                     precision: mem.Precision) -> dict[str, float]:
    """Bytes on the fullest device, by kind (see fullest_rank)."""
    return fullest_rank(model, layout, micro_batches, cluster, precision)[0]


def fullest_rank(model: ModelSpec, layout: Layout, micro_batches: int, cluster: Cluster,
                 precision: mem.Precision) -> tuple[dict[str, float], int]:
    """Bytes on the fullest device and its pipeline rank. Ranks differ in layers, in micro-batches in flight (early
    ranks hold the most) and in the embedding (first) and head and loss (last); the early
    ranks and the last bound them all."""
    worst: dict[str, float] = {}
    for rank in mem._ranks_to_check(layout.pp):
        params = mem.rank_params(model, layout, rank)
        states = mem.model_state_bytes(params, layout.dp * layout.cp, layout.zero, precision)
        activations = mem.rank_activation_bytes(model, layout, micro_batches, precision.activation_bytes, rank)
        buffers = mem.zero3_gather_bytes(model, layout, precision) + cluster.reserved_memory
        breakdown = {**states, "activations": activations, "buffers": buffers}
        breakdown["total"] = sum(breakdown.values())
        if breakdown["total"] > worst.get("total", -1):
            worst = {**breakdown, "rank": rank}
    rank = int(worst.pop("rank"))
    worst["total"] = worst.pop("total")
    return worst, rank


def evaluate(model: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
             assumptions: Assumptions = Assumptions(), need_time_if_unfit: bool = True,
             validated: bool = False) -> Estimate:
    """One layout end to end; `validated`: the caller already ran check_layout (the search)."""
    n_gpus = layout.world_size
    reason = None if validated else check_layout(layout, model, n_gpus, global_batch)
    if reason:
        return Estimate(layout, fits=False, why=reason)
    # Per dp rank, the same on all (ceil rule, plait/layout/batch.py); with an uneven share the
    # fullest rank's micro-batches are costed at micro_batch rows each, an upper bound.
    micro_batches = batch.micro_batches(global_batch, layout.micro_batch, layout.dp)
    precision = assumptions.precision
    memory, fullest = fullest_rank(model, layout, micro_batches, cluster, precision)
    fits = memory["total"] <= cluster.device_memory
    why = None if fits else (
        f"needs {memory['total'] / GB:.1f} GB per device, has {cluster.device_memory / GB:.0f} GB "
        f"(states {(memory['params'] + memory['grads'] + memory['optimizer']) / GB:.1f}, "
        f"activations {memory['activations'] / GB:.1f})")
    estimate = Estimate(layout, fits=fits, why=why, memory_bytes=memory)
    terms = mem.activation_terms(model, layout, micro_batches, precision.activation_bytes, fullest)
    estimate.inputs.update({
        "fullest_pipeline_rank": fullest, "activation_bytes_per_layer": terms["per_layer"],
        "layers_in_flight": terms["layers_in_flight"], "activation_bytes_embedding": terms["embedding"],
        "activation_bytes_loss": terms["loss"]})
    if fits or need_time_if_unfit:
        _fill_times(estimate, model, cluster, layout, global_batch, micro_batches, assumptions)
    return estimate


def _fill_times(est: Estimate, model: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
                micro_batches: int, assumptions: Assumptions) -> None:
    eff = assumptions.efficiency or efficiency_for(cluster)
    net, precision = assumptions.network, assumptions.precision
    gpn, act = cluster.gpus_per_node, precision.activation_bytes
    tp, cp, pp, dp, m = layout.tp, layout.cp, layout.pp, layout.dp, micro_batches
    lt: LayerTimes = _layer_times(model, layout.micro_batch, tp, cp, layout.sequence_parallel,
                                  layout.recompute, cluster, eff, act)
    tokens = layout.micro_batch * model.seq_len / cp  # per device per micro-batch
    hidden_bytes = tokens * model.dim * act

    # Tensor parallel: two all-reduces (or reduce-scatter + all-gather with sequence parallel: the
    # same volume) in the forward, two in the backward, two more when full recompute reruns it.
    tp_span = comm.group_span(tp, 1, gpn)
    tp_collectives = 4 + (2 if layout.recompute == "full" else 0)
    tp_per_layer = tp_collectives * comm.all_reduce_time(hidden_bytes, tp_span, cluster, net)

    # Context parallel (ring attention): K and V chunks go round the ring, hidden behind the
    # attention of the chunk in hand; the backward also returns dK and dV.
    cp_span = comm.group_span(cp, tp, gpn)
    cp_per_layer = 0.0
    if cp > 1:
        kv_bytes = tokens * 2 * model.kv_dim / tp * act * (cp - 1)
        ring_step = comm.p2p_time(kv_bytes, cp_span.nodes > 1, cluster, net)
        passes = 1 + (1 if layout.recompute == "full" else 0)
        cp_per_layer = passes * max(0.0, ring_step - lt.attention_forward) + max(0.0, 2 * ring_step - 2 * lt.attention_forward)

    # Expert parallel: dispatch and combine all-to-alls, forward and backward.
    ep_per_layer = 0.0
    if layout.ep > 1:
        ep_span = comm.group_span(layout.ep, tp * cp, gpn)
        routed_bytes = hidden_bytes * model.experts_per_token / (tp if layout.sequence_parallel else 1)
        ep_per_layer = (4 + (2 if layout.recompute == "full" else 0)) * comm.all_to_all_time(routed_bytes, ep_span, cluster, net)

    # The pipeline runs at the pace of its slowest rank: its layers, plus the LM head and the
    # loss on the last one (plait's partition gives that rank fewer layers for it).
    head_mb = head_time(model, layout.micro_batch, tp, cp, cluster, eff)
    rank_layers = [sum(chunks) for chunks in rank_chunk_layers(model, layout)]
    per_layer = lt.total + tp_per_layer + cp_per_layer + ep_per_layer
    rank_time = [n * per_layer + (head_mb if r == pp - 1 else 0.0) for r, n in enumerate(rank_layers)]
    slowest = rank_time.index(max(rank_time))
    layers = rank_layers[slowest]
    stage_compute = layers * lt.total + (head_mb if slowest == pp - 1 else 0.0)
    comm_mb = {"tp": layers * tp_per_layer, "cp": layers * cp_per_layer, "ep": layers * ep_per_layer}
    t_stage = stage_compute + sum(comm_mb.values())

    factor = 1 / layout.virtual_stages if layout.schedule == "interleaved" else BUBBLE_FACTOR[canonical_schedule(layout.schedule)]
    bubble = (pp - 1) * factor * t_stage

    # Pipeline point-to-point: activations forward, gradients backward, once per model chunk.
    stride_pp = tp * cp * dp
    p2p_bytes = hidden_bytes / tp  # scatter / gather over the tp ranks (or sequence parallel)
    p2p_one = comm.p2p_time(p2p_bytes, stride_pp * pp > gpn, cluster, net) if pp > 1 else 0.0
    pp_exposed = (m + pp - 1) * 2 * layout.virtual_stages * p2p_one if pp > 1 else 0.0

    # Data parallel (over dp x cp, which hold the same weights): gradient sync once per step,
    # hidden behind part of the last micro-batch's backward; ZeRO-3 also gathers weights for
    # every micro-batch's forward and backward.
    shard = dp * cp
    dp_span = comm.group_span(shard, tp, gpn)
    stage_params = [mem.stage_params(model, layout, "first" if i == 0 else "last" if i == pp - 1 else "mid")
                    for i in range(pp)] if pp <= 2 or cluster.node_groups else None
    if stage_params is None:  # middle stages are alike: evaluate first, one middle, last
        stage_params = [mem.stage_params(model, layout, s) for s in ("first", "mid", "last")]
    nics = comm.place_stages([p * precision.grad_bytes for p in stage_params], tp * cp * dp, cluster) \
        if cluster.node_groups else [cluster.inter_node_bw] * len(stage_params)
    backward_window = layers * lt.backward * net.dp_overlap
    dp_exposed = 0.0
    for params, nic in zip(stage_params, nics):
        grad_bytes = params * precision.grad_bytes
        weight_bytes = params * precision.weight_bytes
        if layout.zero == 0:
            sync = comm.all_reduce_time(grad_bytes, dp_span, cluster, net, nic)
            exposed = max(0.0, sync - backward_window)
        elif layout.zero in (1, 2):
            sync = comm.all_gather_time(grad_bytes, dp_span, cluster, net, nic) + \
                comm.all_gather_time(weight_bytes, dp_span, cluster, net, nic)
            exposed = max(0.0, sync - backward_window)
        else:
            gathers = 2 + (1 if layout.recompute == "full" else 0)
            per_mb = gathers * comm.all_gather_time(weight_bytes, dp_span, cluster, net, nic) + \
                comm.all_gather_time(grad_bytes, dp_span, cluster, net, nic)
            exposed = m * max(0.0, per_mb - net.dp_overlap * stage_compute)
        dp_exposed = max(dp_exposed, exposed)

    local_params = max(stage_params) / (shard if layout.zero >= 1 else 1)
    optimizer = optimizer_step_time(local_params, cluster, eff)
    step = m * t_stage + bubble + pp_exposed + dp_exposed + optimizer

    tokens_per_step = global_batch * model.seq_len
    n_gpus = layout.world_size
    est.step_time_s = step
    est.tokens_per_s_per_gpu = tokens_per_step / step / n_gpus
    hardware = model.hardware_flops_per_token(layout.recompute) * est.tokens_per_s_per_gpu
    est.tflops_per_gpu = hardware / 1e12
    est.mfu = model.model_flops_per_token() * est.tokens_per_s_per_gpu / cluster.peak_flops if cluster.peak_flops else None
    est.time_s = {"compute": m * stage_compute, "bubble": bubble, **{k: m * v for k, v in comm_mb.items()},
                  "pp": pp_exposed, "dp": dp_exposed, "optimizer": optimizer}
    est.inputs = {
        **est.inputs,
        "micro_batches": m, "layers_per_stage": layers, "tokens_per_micro_batch_per_device": tokens,
        "layer_forward_s": lt.forward, "layer_backward_s": lt.backward, "layer_recompute_s": lt.recompute,
        "head_s": head_mb, "tp_per_layer_s": tp_per_layer, "pipeline_p2p_s": p2p_one,
        "dp_group": shard, "dp_group_nodes": dp_span.nodes, "tp_group_nodes": tp_span.nodes,
        "stage_params": max(stage_params), "hardware_flops_per_token": model.hardware_flops_per_token(layout.recompute),
        "model_flops_per_token": model.model_flops_per_token(), "peak_flops": cluster.peak_flops,
        "mfu_definition": "(6N + 12 L d s) x tokens/s / peak, N every active parameter",
    }


# --- plait's own runs: the numbers its trainer writes to metrics.jsonl -----------------------
#
# The planner above reasons about large jobs in round numbers. The functions below reproduce
# what one of plait's own runs measures, from the same arithmetic the runtime uses:
# state_bytes (ZeroEngine.state_bytes), comm_bytes (bytes sent through plait's Comm in one
# training step, ring conventions, bookkeeping and checkpoint traffic left out) and
# activation_bytes (saved for backward by the first micro-batch). Each metric is a max over
# ranks; ranks of different pipeline stages differ, the others are symmetric, so every
# pipeline rank is evaluated and the largest value kept.

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
BUILD_BYTES = 4  # plait builds models in fp32, and buckets are cut before the cast to bf16
GRAD_NORM_FLOATS = {"dp_cp": 2, "tp": 1, "pp": 2}  # the tiny all-reduces of clip_grad_norm


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _ring_all_reduce(nbytes: float, n: int) -> float:
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def _ring_gather(nbytes: float, n: int) -> float:
    """All-gather or reduce-scatter of a full buffer of `nbytes`."""
    return (n - 1) / n * nbytes if n > 1 else 0.0


@dataclass(frozen=True)
class RankShape:
    """The parameters one rank holds and where it sits in the pipeline."""
    layers: int  # transformer blocks on this rank (all its model chunks)
    first: bool  # runs the first virtual stage: holds the embedding
    last: bool  # runs the last virtual stage: final norm, LM head, loss
    order: tuple[int, ...]  # parameter sizes in registration order (after tp sharding)
    units: tuple[tuple[int, ...], ...]  # ZeRO-3 gather units: blocks last-first, then the root
    p2p_sends: int = 0  # pipeline messages this rank sends per micro-batch


def _block_params(m, tp: int) -> list[int]:
    """One block's parameters on one tp rank, in registration order (norms are replicated)."""
    head_dim = m.dim // m.n_heads
    q, kv = m.n_heads * head_dim, m.n_kv_heads * head_dim
    return [m.dim, m.dim * q // tp, m.dim * kv // tp, m.dim * kv // tp, q * m.dim // tp,
            m.dim, m.dim * m.ffn_dim // tp, m.dim * m.ffn_dim // tp, m.ffn_dim * m.dim // tp]


def rank_shape(m, tp: int, layers: int, first: bool, last: bool) -> RankShape:
    """Registration order is embed, blocks, final norm, untied head (the dense model's, which
    StageModule keeps). The vocabulary is padded to a multiple of tp. With tied embeddings a
    last pipeline stage holds its own copy of the embedding, registered first."""
    vocab = _ceil_to(m.vocab_size, tp) // tp * m.dim
    head = [vocab] if first or (last and m.tie_embeddings) else []
    tail = ([m.dim] + ([] if m.tie_embeddings else [vocab])) if last else []
    blocks = [_block_params(m, tp) for _ in range(layers)]
    order = head + [n for block in blocks for n in block] + tail
    units = [tuple(b) for b in reversed(blocks)] + ([tuple(head + tail)] if head or tail else [])
    return RankShape(layers, first, last, tuple(order), tuple(units))


def pipeline_ranks(cfg) -> list[RankShape]:
    """Every pipeline rank's share, split by plait's own partition (cost-balanced or explicit)."""
    m, p = cfg.model, cfg.parallel
    if p.pp == 1:
        return [rank_shape(m, p.tp, m.n_layers, True, True)]
    head_cost = head_cost_in_layers(m.dim, m.ffn_dim, m.vocab_size, m.seq_len, m.n_heads, m.n_kv_heads)
    stages = partition_layers(m.n_layers, p.pp, p.pp_virtual_stages, explicit=p.pp_layers or None,
                              head_cost=head_cost)
    last = len(stages) - 1
    shapes = []
    for r in range(p.pp):
        shape = rank_shape(m, p.tp, sum(map(len, rank_chunks(stages, p.pp, r))), r == 0, r == p.pp - 1)
        # Virtual stage s = chunk * pp + r sends activations on unless it is the last, and
        # input gradients back unless it is the first.
        sends = sum((s < last) + (s > 0) for s in range(r, last + 1, p.pp))
        shapes.append(dataclasses.replace(shape, p2p_sends=sends))
    return shapes


def bucket_sizes(shape: RankShape, zero: int, bucket_bytes: int) -> list[int]:
    """Elements per flat bucket, as flat.make_buckets cuts them (padding depends on the cuts):
    ZeRO-3 one bucket per gather unit; otherwise reverse registration order (the order backward
    finishes gradients), a new bucket once the current one reaches bucket_bytes."""
    if zero == 3:
        return [sum(unit) for unit in shape.units]
    out: list[int] = []
    filled = bucket_bytes
    for n in reversed(shape.order):
        if filled >= bucket_bytes:
            out.append(0)
            filled = 0
        out[-1] += n
        filled += n * BUILD_BYTES
    return out


def run_state_bytes(buckets: list[int], shards: int, zero: int, dtype: str, reduce_dtype: str,
                    separate_master: bool) -> int:
    """ZeroEngine.state_bytes on data-parallel rank 0, the one owning the most real elements
    (padding sits at the end of each bucket, in the last rank's slice, and gets no AdamW state)."""
    shards = shards if zero >= 1 else 1
    padded = [_ceil_to(b, shards) for b in buckets]
    slices = [p // shards for p in padded]
    params = sum(slices if zero == 3 else padded) * DTYPE_BYTES[dtype]
    grads = sum(padded if zero <= 1 else slices) * DTYPE_BYTES[reduce_dtype]
    masters = sum(slices) * 4 if separate_master else 0  # fp32 copy of the owned slices
    moments = sum(min(s, b) for s, b in zip(slices, buckets)) * 8  # exp_avg + exp_avg_sq, fp32
    return params + grads + masters + moments


def data_parallel_comm(buckets: list[int], n: int, zero: int, micro_batches: int, dtype: str,
                       reduce_dtype: str, pipelined: bool) -> float:
    """Gradient reduction and ZeRO parameter gathers over the dp x cp group, one step.

    Stages 0-1 reduce once per step (all-reduce; reduce-scatter). Stages 2-3 keep no full
    gradient, so they reduce-scatter after every micro-batch, except under a pipeline, which
    reduces once after the schedule. Stages 1-2 all-gather the updated parameters after the
    step; stage 3 instead gathers each block before its forward and again before its backward,
    and the root unit (embedding, final norm, head: the last bucket) once per micro-batch.
    """
    if n == 1:
        return 0.0
    padded = [_ceil_to(b, n if zero >= 1 else 1) for b in buckets]
    grads, params = sum(padded) * DTYPE_BYTES[reduce_dtype], sum(padded) * DTYPE_BYTES[dtype]
    if zero == 0:
        return _ring_all_reduce(grads, n)
    reductions = micro_batches if zero >= 2 and not pipelined else 1
    total = reductions * _ring_gather(grads, n) + _ring_all_reduce(4 * GRAD_NORM_FLOATS["dp_cp"], n)
    if zero in (1, 2):
        total += _ring_gather(params, n)
    else:
        gathered = (2 * sum(padded[:-1]) + padded[-1]) * DTYPE_BYTES[dtype]
        total += micro_batches * _ring_gather(gathered, n)
    return total


def tensor_parallel_comm(shape: RankShape, m, tp: int, sequence_parallel: bool, tokens: int,
                         act_bytes: int) -> float:
    """tensor_comm.py traffic of one micro-batch's forward + backward on one rank.

    `tokens` = micro_batch x seq / cp: every collective moves a full-sequence [b, s, dim] buffer.
    Sequence parallel, per block: two all-gathers (norm outputs) and two reduce-scatters (row
    outputs) forward, their conjugates backward, and two more all-gathers in backward where
    SequenceRegather rebuilds the column-parallel inputs; plus one all-reduce of each norm
    weight's gradient (copy_to_tp). Without it: four all-reduces per block (two forward, two
    backward). The embedding adds a region exit, the final norm an entry (+ regather for the
    head), and the vocabulary-parallel cross-entropy two all-reduces of [tokens] and [2, tokens].
    """
    if tp == 1:
        return 0.0
    hidden = tokens * m.dim * act_bytes
    L, first, last = shape.layers, int(shape.first), int(shape.last)
    if sequence_parallel:
        gathers = 6 * L + first + 2 * last
        scatters = 4 * L + first + last
        norms = (2 * L + last) * _ring_all_reduce(m.dim * act_bytes, tp)
        total = (gathers + scatters) * _ring_gather(hidden, tp) + norms
    else:
        total = (4 * L + first + last) * _ring_all_reduce(hidden, tp)
    return total + last * _ring_all_reduce(3 * tokens * 4, tp)  # loss terms are fp32


def context_parallel_comm(shape: RankShape, m, tp: int, cp: int, micro_batch: int) -> float:
    """Ring attention of one micro-batch, all layers: the stacked fp32 K and V block [2, b,
    kv_heads/tp, seq/cp, head_dim] is passed cp-1 times forward and cp-1 times backward, where
    its gradient accumulator also goes round the whole ring (cp times)."""
    if cp == 1:
        return 0.0
    head_dim = m.dim // m.n_heads
    block = 2 * micro_batch * (m.n_kv_heads // tp) * (m.seq_len // cp) * head_dim * 4
    return shape.layers * (3 * cp - 2) * block


def pipeline_comm(shape: RankShape, cfg, micro_batches: int, grad_bytes: int) -> float:
    """Stage-to-stage sends of one step (hidden states [b, s/cp (/tp with sequence parallel),
    dim] in the compute dtype, activations forward, gradients backward), plus the all-reduce
    that sums the two copies of a tied embedding's gradient (first and last rank)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.pp == 1:
        return 0.0
    split = p.tp if p.tp > 1 and p.sequence_parallel else 1
    message = t.micro_batch * m.seq_len // p.cp // split * m.dim * DTYPE_BYTES[t.dtype]
    total = micro_batches * shape.p2p_sends * message
    if m.tie_embeddings and (shape.first or shape.last):
        total += _ring_all_reduce(shape.order[0] * grad_bytes, 2)
    return total


def run_activation_bytes(cfg) -> float | None:
    """activation_bytes of the first micro-batch, by the planner's per-layer count (plait's
    unfused norms). None under pipeline parallelism, where the trainer does not measure it."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.pp > 1:
        return None
    layout = Layout(tp=p.tp, cp=p.cp, dp=p.dp, micro_batch=t.micro_batch, recompute=t.recompute,
                    sequence_parallel=p.sequence_parallel and p.tp > 1)
    act = DTYPE_BYTES[t.dtype]
    return mem.stage_activation_bytes(from_plait_model(m, cfg.name), layout, 1, act, "first")


def predict_run_metrics(cfg, world_size: int, device_type: str | None = None) -> dict[str, float | None]:
    """What plait's trainer reports in metrics.jsonl for a run of `cfg` on `world_size` ranks,
    for any layout plait runs (data, ZeRO 0-3, tensor + sequence, context, pipeline parallel).

    `cfg` is a plait `Config` (a validated copy is used, so dp, micro_batch and pp_microbatches
    are filled in). comm_bytes is a training step's traffic; the last step's evaluation and
    checkpoint traffic are not in it. `device_type` ("cpu", "cuda"; default from
    train.device, "auto" read as cpu) only matters for offload=optimizer, which keeps a
    separate fp32 master copy when the optimizer's device is not the parameters'.
    Not modelled: activation recomputation's extra forward traffic (tp, cp, ZeRO-3 gathers).
    """
    cfg = validate(copy.deepcopy(cfg), world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    device_type = device_type or ("cuda" if t.device == "cuda" else "cpu")
    micro_batches = accumulation_steps(cfg)
    n = p.dp * p.cp  # ZeRO and gradient reduction run over dp x cp: they hold the same weights
    separate_master = t.dtype != "fp32" or (p.offload == "optimizer" and device_type != "cpu")
    tokens = t.micro_batch * m.seq_len // p.cp
    act = DTYPE_BYTES[t.dtype]
    states, comms = [], []
    for shape in pipeline_ranks(cfg):
        buckets = bucket_sizes(shape, p.zero, int(p.bucket_mb * 2**20))
        states.append(run_state_bytes(buckets, n, p.zero, t.dtype, p.reduce_dtype, separate_master))
        per_micro_batch = (tensor_parallel_comm(shape, m, p.tp, p.sequence_parallel, tokens, act)
                           + context_parallel_comm(shape, m, p.tp, p.cp, t.micro_batch))
        comms.append(micro_batches * per_micro_batch
                     + data_parallel_comm(buckets, n, p.zero, micro_batches, t.dtype, p.reduce_dtype, p.pp > 1)
                     + pipeline_comm(shape, cfg, micro_batches, act)
                     + _ring_all_reduce(4 * GRAD_NORM_FLOATS["tp"], p.tp)
                     + _ring_all_reduce(4 * GRAD_NORM_FLOATS["pp"], p.pp))
    return {
        "n_params": _dense_params(cfg),
        "state_bytes": max(states),
        "comm_bytes": max(comms),
        "activation_bytes": run_activation_bytes(cfg),
    }


def _dense_params(cfg) -> int:
    """Parameters of the dense model (tied weights once), as the trainer's count."""
    return from_plait_model(cfg.model, cfg.name).n_params()
