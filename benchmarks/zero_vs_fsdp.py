"""plait's ZeRO-3 against PyTorch's FSDP2 (`fully_shard`), side by side on gloo.

Both shard parameters, gradients and AdamW state over all ranks, wrapping each transformer
block as one unit and the embedding/norm/head as the root. Rounds alternate between the two;
figures are medians. Prints, per world size, the step-time ratio plait / FSDP2 and each one's
per-rank state bytes (parameters + gradients + optimizer moments), as JSON lines.

    python benchmarks/zero_vs_fsdp.py [--steps 10] [--rounds 4] [--worlds 2 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from common import MICRO_BATCH, MODEL, init_rank, make_batches, run_world, timed_steps
from plait.config import OptimConfig
from plait.model import build_model
from plait.comm import Comm, Group
from plait.parallel.zero import ZeroEngine
from plait.parallel.zero3 import Zero3Gatherer, transformer_units


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def fsdp_state_bytes(model, optimizer) -> int:
    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return local_bytes(params) + local_bytes(p.grad for p in params if p.grad is not None) + local_bytes(moments)


def worker(rank: int, world: int, store_path: str, steps: int, rounds: int, queue) -> None:
    init_rank(rank, world, store_path)
    optim = OptimConfig(lr=1e-3, weight_decay=0.0)
    plait_model = build_model(MODEL, seed=0)
    engine = ZeroEngine(plait_model, Comm(), Group("dp", list(range(world)), rank, dist.group.WORLD), optim,
                        stage=3, dtype="fp32", reduce_dtype="fp32", bucket_bytes=0, device=torch.device("cpu"),
                        units=transformer_units(plait_model))
    Zero3Gatherer(engine, plait_model)

    fsdp_model = build_model(MODEL, seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for block in fsdp_model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)
    fsdp_opt = torch.optim.AdamW(fsdp_model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=0.0, foreach=True)

    def plait_update():
        engine.step(optim.lr)
        engine.zero_grad()

    def fsdp_update():
        fsdp_opt.step()
        fsdp_opt.zero_grad(set_to_none=False)  # keep gradients resident, as plait does

    batches = make_batches(steps, rank)
    # plait sums gradients (loss over global tokens); FSDP averages them (loss over local tokens).
    local_tokens = MICRO_BATCH * MODEL.seq_len
    plait_times, fsdp_times = [], []
    for round_index in range(rounds + 1):  # round 0 warms up both and is not counted
        p = timed_steps(plait_model, batches, local_tokens * world, lambda: engine.micro_batch(final=True), plait_update)
        f = timed_steps(fsdp_model, batches, local_tokens, contextlib.nullcontext, fsdp_update)
        if round_index:
            plait_times += p
            fsdp_times += f
    plait_params = engine.full_state(optimizer=False)[0]
    drift = max((plait_params[n] - p.full_tensor()).abs().max().item() for n, p in fsdp_model.named_parameters())
    result = {"plait_step_s": statistics.median(plait_times), "fsdp2_step_s": statistics.median(fsdp_times),
              "plait_state_bytes": engine.state_bytes(), "fsdp2_state_bytes": fsdp_state_bytes(fsdp_model, fsdp_opt),
              "max_param_difference": drift}
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    n_params = sum(p.numel() for p in build_model(MODEL, seed=0).parameters())
    rows = []
    for world in args.worlds:
        r = run_world(worker, world, args.steps, args.rounds)
        rows.append({"benchmark": "zero_vs_fsdp", "world_size": world, "parameters": n_params, **r,
                     "time_ratio": r["plait_step_s"] / r["fsdp2_step_s"],
                     "state_bytes_ratio": r["plait_state_bytes"] / r["fsdp2_state_bytes"]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "zero_vs_fsdp", "summary": {
        str(r["world_size"]): {"time_ratio": round(r["time_ratio"], 3), "state_bytes_ratio": round(r["state_bytes_ratio"], 3)}
        for r in rows}, "target": "time_ratio <= 1.0 and state_bytes_ratio <= 1.0"}))


if __name__ == "__main__":
    main()
