"""Shared pieces of the side-by-side benchmarks: spawning gloo ranks, batches, timed steps.

Each benchmark alternates rounds between plait and the PyTorch reference inside one
process group, so machine noise hits both alike; figures are medians over the rounds that
follow a warm-up round, and what matters is the ratio, not absolute times.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from plait.config import ModelConfig

MODEL = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=256, seq_len=128)
MICRO_BATCH = 4


def init_rank(rank: int, world: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def make_batches(steps: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    data = torch.randint(0, MODEL.vocab_size, (steps, MICRO_BATCH, MODEL.seq_len + 1), generator=gen)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def timed_steps(model, batches, tokens: int, backward_context, update: Callable[[], None]) -> list[float]:
    """Seconds per step of forward, backward (inside `backward_context`) and `update`."""
    times = []
    for inputs, targets in batches:
        start = time.perf_counter()
        with backward_context():
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum") / tokens
            loss.backward()
        update()
        times.append(time.perf_counter() - start)
    return times


def run_world(worker: Callable, world: int, *args) -> dict:
    """Run worker(rank, world, store_path, *args, queue) on `world` processes; rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, os.path.join(tmp, "store"), *args, queue),
                           nprocs=world, start_method="spawn", join=True)
    return queue.get(timeout=10)
