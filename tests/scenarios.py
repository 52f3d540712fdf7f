"""Training scenarios that test workers run, and what they report back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from plait import config as config_mod

# The tiny preset, shortened: 20 steps, global batch 16 of 128-token windows, micro-batch 4
# (so dp 1/2/4 run 4/2/1 accumulation steps), checkpoints every 10 steps.
BASE = [
    "train.steps=20", "train.global_batch=16", "train.micro_batch=4", "train.eval_every=0",
    "train.eval_batches=1", "train.sample_tokens=0", "train.threads=1", "train.dtype=fp32",
    "checkpoint.every=10", "checkpoint.keep=5", "log.tensorboard=false", "log.progress=none",
]


def params_digest(params: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(params.items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def run_training(overrides: list[str], run_dir: str) -> dict:
    """Train the shortened tiny model in this process (one rank of the current group)."""
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    cfg = config_mod.load_config("tiny", BASE + overrides)
    trainer = Trainer(cfg, Path(run_dir), init_runtime(cfg))
    try:
        trainer.start()
        result = trainer.fit()
        # Through the engine: under ZeRO-3 the model's own tensors are released slices.
        digest = params_digest(trainer.parallel.full_state(optimizer=False)[0])
    finally:
        trainer.close()
    return {"losses": result.losses, "val_loss": result.val_loss, "digest": digest,
            "final_step": result.final_step}


def run_many(rank: int, world_size: int, jobs: list[tuple[str, list[str], str]]) -> dict:
    """Run named (overrides, run_dir) jobs one after another in the same process group."""
    os.environ.setdefault("PLAIT_CACHE", str(Path(jobs[0][2]).parent / "cache"))
    return {name: run_training(overrides, run_dir) for name, overrides, run_dir in jobs}


def train_cli(run_dir, overrides: list[str], nproc: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """`plait train --nproc N --run-dir DIR --set ...` in a subprocess (warnings silenced); never raises
    on a non-zero exit, so tests can check the exit code and stderr."""
    args = [sys.executable, "-m", "plait", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
