"""plait's tensor parallelism against PyTorch's DTensor tensor parallelism, side by side on gloo.

Every rank of one tp group trains the same model on the same batches (no data parallelism),
once with plait's `apply_tensor_parallel` and once with `parallelize_module` and the
ColwiseParallel / RowwiseParallel / SequenceParallel styles, each with and without sequence
parallelism: four models in one process group. Both sides use the same layout, which is
Megatron's (and torchtitan's):

  attention q/k/v and MLP gate/up column-parallel, wo and down row-parallel; the block's
  input enters the tensor-parallel region once for q/k/v and once for gate/up;
  embedding split over the vocabulary (row-wise), LM head split over the vocabulary
  (column-wise) and the loss taken from the vocabulary-sharded logits
  (plait: vocab_parallel_cross_entropy; DTensor: F.cross_entropy under loss_parallel());
  with sequence parallelism norms and residuals hold 1/tp of the sequence.

`--dtensor-loss replicated` gathers the full logits on the DTensor side instead and takes a
plain cross-entropy (the simpler, costlier plan). Embeddings are untied on both sides, since
a tied weight cannot be both row- and column-sharded by parallelize_module.

Rounds alternate between the four models; round 0 warms up and is not counted; figures are
medians. Prints, per tp degree, the step-time ratios plait / DTensor and the correctness
checks as JSON lines, then a summary. The checks: loss and (gathered) gradients of one step
before any update, and loss on an unseen batch after all rounds, must agree within 1e-4.
The parameters after training are reported too but drift further apart (~1e-4..1e-3):
Adam's first updates are about lr * sign(gradient), so elements whose gradient is ~1e-10
flip with float noise on either side (both match a dense model's gradients to ~1e-8).

    python benchmarks/tp_vs_dtensor.py [--steps 6] [--rounds 4] [--worlds 2 4]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from common import MICRO_BATCH, MODEL, init_rank, make_batches, run_world
from plait.model import build_model
from plait.comm import Comm, Group
from plait.parallel.tensor import apply_tensor_parallel, gather_full, vocab_parallel_cross_entropy

CFG = dataclasses.replace(MODEL, tie_embeddings=False)
TOKENS = MICRO_BATCH * CFG.seq_len  # every tp rank sees the whole micro-batch


def dtensor_plan(sequence_parallel: bool, dtensor_loss: str) -> str:
    sp = ("SequenceParallel norms; attn/mlp PrepareModuleInput Shard(1)->Replicate; "
          "wo/w_down RowwiseParallel(output_layouts=Shard(1)); embed RowwiseParallel(input_layouts=Replicate(), "
          "output_layouts=Shard(1)); lm_head ColwiseParallel(input_layouts=Shard(1), ")
    no_sp = ("norms plain replicated; attn/mlp PrepareModuleInput Replicate (one region entry per block half); "
             "wo/w_down RowwiseParallel(); embed RowwiseParallel(input_layouts=Replicate()); lm_head ColwiseParallel(")
    head = ("output_layouts=Shard(-1), use_local_output=False) + F.cross_entropy under loss_parallel()"
            if dtensor_loss == "parallel" else "output_layouts=Replicate()) + F.cross_entropy on full logits")
    return "wq/wk/wv/w_gate/w_up ColwiseParallel; " + (sp if sequence_parallel else no_sp) + head


def build_dtensor(mesh, world: int, sequence_parallel: bool, dtensor_loss: str):
    model = build_model(CFG, seed=0)
    for block in model.blocks:
        block.attn.n_heads //= world  # plait's Attention reshapes with these: heads local to this rank
        block.attn.n_kv_heads //= world
        enter = Shard(1) if sequence_parallel else Replicate()
        plan = {
            "attn": PrepareModuleInput(input_layouts=(enter, None, None), desired_input_layouts=(Replicate(), None, None)),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel(),
            "mlp": PrepareModuleInput(input_layouts=(enter,), desired_input_layouts=(Replicate(),)),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel(),
        }
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
        parallelize_module(block, mesh, plan)
    head_out = dict(output_layouts=Shard(-1), use_local_output=False) if dtensor_loss == "parallel" \
        else dict(output_layouts=Replicate())
    if sequence_parallel:
        top = {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
               "norm": SequenceParallel(),
               "lm_head": ColwiseParallel(input_layouts=Shard(1), **head_out)}
    else:
        top = {"embed": RowwiseParallel(input_layouts=Replicate()), "lm_head": ColwiseParallel(**head_out)}
    parallelize_module(model, mesh, top)
    return model


def build_plait(tp: Group, comm: Comm, sequence_parallel: bool):
    model = build_model(CFG, seed=0)
    shards = apply_tensor_parallel(model, tp, comm, sequence_parallel=sequence_parallel, seed=None)
    return model, shards


def timed(loss_fn, batches, context, update) -> list[float]:
    """Seconds per step of forward and backward (inside `context`) and `update`."""
    times = []
    for inputs, targets in batches:
        start = time.perf_counter()
        with context():
            loss_fn(inputs, targets).backward()
        update()
        times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, store_path: str, steps: int, rounds: int, dtensor_loss: str, queue) -> None:
    init_rank(rank, world, store_path)
    tp = Group("tp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    mesh = init_device_mesh("cpu", (world,))
    dense = build_model(CFG, seed=0)
    context = loss_parallel if dtensor_loss == "parallel" else contextlib.nullcontext

    def plait_loss(model):
        return lambda inputs, targets: vocab_parallel_cross_entropy(
            model(inputs), targets, tp, comm, CFG.vocab_size).sum() / TOKENS

    def dtensor_loss_fn(model):
        return lambda inputs, targets: F.cross_entropy(
            model(inputs).flatten(0, 1), targets.flatten(), reduction="sum") / TOKENS

    def value(loss) -> float:
        return (loss.full_tensor() if isinstance(loss, DTensor) else loss).item()

    def optimizer(model):
        params = list(model.parameters())
        dtensors = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        # foreach kernels refuse lists that mix DTensor and plain tensors (the DTensor side's
        # norms without sequence parallelism), so those go in separate parameter groups.
        opt = torch.optim.AdamW([{"params": g} for g in (dtensors, plain) if g], foreach=True)
        # Under DTensor sequence parallelism the norms' replicated weights come out of backward
        # with Partial (unsummed) gradients; sum each once here (plait does it inside backward),
        # rather than leave AdamW's ops to redistribute them implicitly.
        partial = [p for p in model.parameters() if isinstance(p, DTensor) and p.placements == (Replicate(),)]

        def update():
            for p in partial:
                if p.grad is not None and p.grad.placements != p.placements:
                    p.grad = p.grad.redistribute(placements=p.placements)
            opt.step()
            opt.zero_grad()  # set_to_none: DTensor cannot zero a Partial gradient in place
        return update

    batches = make_batches(steps, rank=0)  # the same batch on every tp rank
    check_inputs, check_targets = make_batches(1, rank=1)[0]  # a batch never trained on
    with torch.no_grad():
        dense_loss = (F.cross_entropy(dense(check_inputs).flatten(0, 1), check_targets.flatten(), reduction="sum")
                      / TOKENS).item()

    result = {}
    variants = []
    for sp in (True, False):
        plait_model, shards = build_plait(tp, comm, sp)
        dt_model = build_dtensor(mesh, world, sp, dtensor_loss)
        variants.append(dict(sp=sp, plait=plait_model, shards=shards, dtensor=dt_model,
                             plait_loss=plait_loss(plait_model), dtensor_loss=dtensor_loss_fn(dt_model),
                             plait_update=optimizer(plait_model), dtensor_update=optimizer(dt_model),
                             plait_times=[], dtensor_times=[]))

    def plait_full(v, grads: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in v["plait"].named_parameters():
            t = (param.grad if grads else param).detach()
            out[name] = t if name not in v["shards"] else gather_full(t, v["shards"][name], tp, comm)
        return out

    def dtensor_full(v, grads: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in v["dtensor"].named_parameters():
            t = (param.grad if grads else param).detach()
            out[name] = t.full_tensor() if isinstance(t, DTensor) else t  # sums a Partial gradient too
        return out

    def max_difference(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max((a[name] - b[name]).abs().max().item() for name in a)

    for v in variants:  # one untimed step's loss and gradients, before any update
        suffix = "_sp" if v["sp"] else "_no_sp"
        p = v["plait_loss"](check_inputs, check_targets)
        p.backward()
        with context():
            d = v["dtensor_loss"](check_inputs, check_targets)
            d.backward()
        p, d = p.item(), value(d)
        result["initial_loss_difference" + suffix] = abs(p - d)
        result["initial_loss_vs_dense" + suffix] = max(abs(p - dense_loss), abs(d - dense_loss))
        result["max_grad_difference" + suffix] = max_difference(plait_full(v, True), dtensor_full(v, True))
        v["plait"].zero_grad()
        v["dtensor"].zero_grad()

    for round_index in range(rounds + 1):  # round 0 warms up all four and is not counted
        for v in variants:
            p = timed(v["plait_loss"], batches, contextlib.nullcontext, v["plait_update"])
            d = timed(v["dtensor_loss"], batches, context, v["dtensor_update"])
            if round_index:
                v["plait_times"] += p
                v["dtensor_times"] += d

    for v in variants:
        suffix = "_sp" if v["sp"] else "_no_sp"
        drift = max_difference(plait_full(v, False), dtensor_full(v, False))
        with torch.no_grad():
            p = v["plait_loss"](check_inputs, check_targets).item()
            with context():
                d = value(v["dtensor_loss"](check_inputs, check_targets))
        plait_s, dtensor_s = statistics.median(v["plait_times"]), statistics.median(v["dtensor_times"])
        result.update({"plait_step_s" + suffix: plait_s, "dtensor_step_s" + suffix: dtensor_s,
                       "time_ratio" + suffix: plait_s / dtensor_s,
                       "max_param_difference" + suffix: drift, "final_loss_difference" + suffix: abs(p - d)})
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="tp degrees")
    parser.add_argument("--dtensor-loss", choices=["parallel", "replicated"], default="parallel",
                        help="DTensor LM head: vocab-sharded logits + loss_parallel (as plait), or gathered logits")
    args = parser.parse_args()
    n_params = sum(p.numel() for p in build_model(CFG, seed=0).parameters())
    rows = []
    for world in args.worlds:
        r = run_world(worker, world, args.steps, args.rounds, args.dtensor_loss)
        rows.append({"benchmark": "tp_vs_dtensor", "tp": world, "parameters": n_params, "micro_batch": MICRO_BATCH,
                     "seq_len": CFG.seq_len, "tie_embeddings": False,
                     "dtensor_plan_sp": dtensor_plan(True, args.dtensor_loss),
                     "dtensor_plan_no_sp": dtensor_plan(False, args.dtensor_loss), **r})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "tp_vs_dtensor", "summary": {
        str(r["tp"]): {"sp": round(r["time_ratio_sp"], 3), "no_sp": round(r["time_ratio_no_sp"], 3),
                       "max_difference": max(r[k + s] for k in ("initial_loss_difference", "max_grad_difference",
                                                                 "final_loss_difference") for s in ("_sp", "_no_sp"))}
        for r in rows}, "target": "time_ratio (plait / DTensor) <= 1.0; max_difference (losses, gradients) <= 1e-4"}))


if __name__ == "__main__":
    main()
