"""What `train.compile_scope` costs and buys: the whole model as one graph vs block by block.

For models of growing depth it times, in one process, eager steps and compiled steps with
each scope: the compile time (first step minus an eager step) and the steady step time as a
ratio to eager. `train.compile_scope = auto` in plait/train/compute.py picks `blocks` from
the depth where the whole-model compile time stops paying for itself; this benchmark is the
measurement behind that threshold, on CPU here and on the GPU when one is lent.

    python benchmarks/compile_scope.py [--layers 2 8 16 24] [--dim 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from plait.config import ModelConfig, load_config
from plait.model import build_model
from plait.train.compute import ComputePlan, MicroBatchLoss


def full_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: ModelConfig, scope: str | None, batch: int, steps: int, device: torch.device, dtype) -> dict:
    torch._dynamo.reset()
    model = build_model(cfg, seed=0, device=device).to(dtype)
    plan = ComputePlan("reference", scope, chunked_ce=False, ce_chunk_tokens=4096)
    loss_sum = MicroBatchLoss(model, plan, full_loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device,
                         generator=torch.Generator(device).manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]
    times = []
    for _ in range(steps + 2):  # the first compiles; the second may still recompile (grads now exist)
        sync(device)
        start = time.perf_counter()
        loss_sum(x, y, None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"first_step_s": times[0], "step_s": statistics.median(times[2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16, 24])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    # Compile from scratch every time: Inductor's on-disk caches would hide the compile time of
    # whichever scope runs second.
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_config("tiny").model
    for layers in args.layers:
        cfg = ModelConfig(**{**base.__dict__, "dim": args.dim, "n_heads": max(1, args.dim // 64),
                             "n_kv_heads": max(1, args.dim // 64), "ffn_dim": args.dim * 8 // 3 // 32 * 32,
                             "n_layers": layers, "seq_len": args.seq})
        eager = run(cfg, None, args.batch, args.steps, device, dtype)
        row = {"benchmark": "compile_scope", "device": device.type, "layers": layers, "dim": args.dim,
               "eager_step_s": eager["step_s"]}
        for scope in ("model", "blocks"):
            r = run(cfg, scope, args.batch, args.steps, device, dtype)
            row[f"{scope}_compile_s"] = r["first_step_s"] - eager["step_s"]
            row[f"{scope}_step_vs_eager"] = r["step_s"] / eager["step_s"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
