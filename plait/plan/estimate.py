"""Evaluate one layout: does it fit, how long is a step, where does the time go.

Step time = m x t_stage + bubble + exposed pipeline, data-parallel and optimizer time, where
t_stage is one micro-batch's forward + backward (+ recompute) on the slowest pipeline stage,
including tensor-, context- and expert-parallel communication that nothing hides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from plait.plan import comm_model as comm
from plait.plan import memory as mem
from plait.plan.cluster import GB, Cluster
from plait.plan.comm_model import NetworkEfficiency
from plait.plan.compute import Efficiency, LayerTimes, head_time, layer_times, optimizer_step_time
from plait.plan.layouts import Layout, check_layout, layers_per_stage
from plait.plan.models import ModelSpec

BUBBLE_FACTOR = {"1f1b": 1.0, "gpipe": 1.0, "zb-h1": 1 / 3}  # x (p - 1) stage times; interleaved: 1/v


@dataclass(frozen=True)
class Assumptions:
    """Everything that is not the model, the cluster or the layout."""
    precision: mem.Precision = mem.PRECISIONS["bf16"]
    efficiency: Efficiency = Efficiency()
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
    """Bytes on the fullest device: the first or the last pipeline stage."""
    worst: dict[str, float] = {}
    for stage in (("first",) if layout.pp == 1 else ("first", "last")):
        params = mem.stage_params(model, layout, stage)
        states = mem.model_state_bytes(params, layout.dp * layout.cp, layout.zero, precision)
        activations = mem.stage_activation_bytes(model, layout, micro_batches, precision.activation_bytes, stage)
        buffers = mem.zero3_gather_bytes(model, layout, precision) + cluster.reserved_memory
        breakdown = {**states, "activations": activations, "buffers": buffers}
        breakdown["total"] = sum(breakdown.values())
        if breakdown["total"] > worst.get("total", -1):
            worst = breakdown
    return worst


def evaluate(model: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
             assumptions: Assumptions = Assumptions(), need_time_if_unfit: bool = True) -> Estimate:
    n_gpus = layout.world_size
    reason = check_layout(layout, model, n_gpus, global_batch)
    if reason:
        return Estimate(layout, fits=False, why=reason)
    micro_batches = global_batch // (layout.dp * layout.micro_batch)
    precision = assumptions.precision
    memory = memory_breakdown(model, layout, micro_batches, cluster, precision)
    fits = memory["total"] <= cluster.device_memory
    why = None if fits else (
        f"needs {memory['total'] / GB:.1f} GB per device, has {cluster.device_memory / GB:.0f} GB "
        f"(states {(memory['params'] + memory['grads'] + memory['optimizer']) / GB:.1f}, "
        f"activations {memory['activations'] / GB:.1f})")
    estimate = Estimate(layout, fits=fits, why=why, memory_bytes=memory)
    if fits or need_time_if_unfit:
        _fill_times(estimate, model, cluster, layout, global_batch, micro_batches, assumptions)
    return estimate


def _fill_times(est: Estimate, model: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
                micro_batches: int, assumptions: Assumptions) -> None:
    eff, net, precision = assumptions.efficiency, assumptions.network, assumptions.precision
    gpn, act = cluster.gpus_per_node, precision.activation_bytes
    tp, cp, pp, dp, m = layout.tp, layout.cp, layout.pp, layout.dp, micro_batches
    lt: LayerTimes = _layer_times(model, layout.micro_batch, tp, cp, layout.sequence_parallel,
                                  layout.recompute, cluster, eff, act)
    layers = layers_per_stage(model, layout)
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

    compute_mb = layers * lt.total
    head_mb = head_time(model, layout.micro_batch, tp, cp, cluster, eff)
    last_extra = head_mb  # the last stage also runs the LM head and the loss
    stage_compute = compute_mb + (last_extra if pp > 1 else head_mb)
    comm_mb = {"tp": layers * tp_per_layer, "cp": layers * cp_per_layer, "ep": layers * ep_per_layer}
    t_stage = stage_compute + sum(comm_mb.values())

    factor = 1 / layout.virtual_stages if layout.schedule == "interleaved" else BUBBLE_FACTOR[layout.schedule]
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
        "micro_batches": m, "layers_per_stage": layers, "tokens_per_micro_batch_per_device": tokens,
        "layer_forward_s": lt.forward, "layer_backward_s": lt.backward, "layer_recompute_s": lt.recompute,
        "head_s": head_mb, "tp_per_layer_s": tp_per_layer, "pipeline_p2p_s": p2p_one,
        "dp_group": shard, "dp_group_nodes": dp_span.nodes, "tp_group_nodes": tp_span.nodes,
        "stage_params": max(stage_params), "hardware_flops_per_token": model.hardware_flops_per_token(layout.recompute),
        "model_flops_per_token": model.model_flops_per_token(), "peak_flops": cluster.peak_flops,
        "mfu_definition": "(6N + 12 L d s) x tokens/s / peak, N every active parameter",
    }


def predict_run_metrics(cfg, world_size: int) -> dict[str, float]:
    """What plait's trainer will report for plain data parallelism (zero=0) with AdamW.

    `cfg` is a plait `Config`. state_bytes: parameters + gradients + AdamW m and v on one rank
    (4 + 4 + 8 bytes per parameter in fp32; parameters counted once even when tied).
    comm_bytes: bytes the busiest rank sends per step, one ring all-reduce of all fp32
    gradients, 2(n-1)/n x 4N. activation_bytes: Korthikanti's per-layer count for one
    micro-batch (flash attention, no recompute) plus the final norm, head input and fp32 logits.
    """
    from plait.plan.models import from_plait_model  # local: keeps this module free of plait.config

    model = from_plait_model(cfg.model, cfg.name)
    n_params = model.n_params()
    element_bytes = 2.0 if cfg.train.dtype == "bf16" else 4.0
    dp = world_size // max(1, cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    micro_batch = cfg.train.micro_batch or cfg.train.global_batch // max(1, dp)
    layout = Layout(dp=max(1, dp), micro_batch=micro_batch)
    activations = mem.stage_activation_bytes(model, layout, 1, element_bytes, "first")
    fp32_adamw = mem.PRECISIONS["fp32"]
    return {
        "n_params": n_params,
        "state_bytes": n_params * fp32_adamw.state_bytes,
        "comm_bytes": comm.ring_all_reduce_bytes_sent(4.0 * n_params, world_size),
        "activation_bytes": activations,
    }
