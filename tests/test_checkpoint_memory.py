"""Host memory of saving and loading sharded checkpoints: each rank pays for its own share only.

A 31.6M-parameter model (the tiny preset widened: dim 512, 10 layers, ffn 1536) on 4 gloo ranks,
at dp 4 with ZeRO-3 and at tp 2 x pp 2. After one training step each rank measures the extra
host memory (peak resident set during the call minus the resident set before it; the peak is
reset through /proc/self/clear_refs) of:

- a synchronous save (`Trainer.save_checkpoint` with checkpoint.async_save off);
- a background save, twice: the first allocates the staging buffers, the second reuses them;
- a resume from that checkpoint into a freshly built trainer (`Trainer.start`), whose optimizer
  moments are made by the load itself;
- as the reference, the old whole-state path: `ParallelModel.full_state()` gathered on every
  rank and, on rank 0, written with one torch.save.

A rank's own share is the bytes of the pieces it holds (fp32 masters and AdamW moments: what it
writes, plus replicas another rank writes). A save, synchronous or not, and a load may each take
at most 1.25x that share plus ALLOWANCE_BYTES: a synchronous save copies each box out of its
bucket before writing it and DCP keeps some of those copies until the rank's file is done (at
most what the rank writes); a background save's staging buffers are what the rank writes, made
once; a fresh trainer's load makes its moments (2/3 of its share) and reads one stored chunk at
a time. The numbers are printed (pytest -s), the old path's too, which takes several times more.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
from pathlib import Path

import pytest
import torch

from distributed import run_on_ranks
from plait import config as config_mod
from scenarios import BASE

pytestmark = pytest.mark.timeout(300)

WIDE = ["model.dim=512", "model.n_layers=10", "model.ffn_dim=1536", "model.n_heads=8", "model.n_kv_heads=4",
        "model.seq_len=32", "train.global_batch=4", "train.micro_batch=1", "train.steps=1", "checkpoint.every=0",
        "checkpoint.async_save=false"]
LAYOUTS = {"dp4_zero3": ["parallel.zero=3"], "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"]}
# Independent of the model's size: the interpreter's and allocator's growth while DCP plans and
# gathers (its plans and metadata are pickled per piece: ZeRO-3 gives a rank a few hundred
# boxes), sha256's 4 MiB read buffer, torch.save's zip writer, the stacks and glibc arenas of
# the writer's and gloo's threads. Measured here: about 10 MiB beyond the pieces.
ALLOWANCE_BYTES = 32 << 20
SLACK = 1.25


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def extra_memory(call) -> int:
    """Peak resident bytes during `call()` beyond the resident bytes before it."""
    gc.collect()
    # Memory freed earlier (the last step's activations, the previous trainer) stays resident in
    # glibc's heaps and would serve the call unseen: give it back to the system first.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status("VmRSS")
    call()
    return _status("VmHWM") - before


def _trainer(overrides: list[str], run_dir: Path):
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    cfg = config_mod.load_config("tiny", BASE + WIDE + overrides)
    return Trainer(cfg, run_dir, init_runtime(cfg))


def measure_layout(rank: int, world_size: int, overrides: list[str], run_dir: Path) -> dict:
    from plait.train.async_writer import AsyncCheckpointer

    found = {"rank": rank}
    trainer = _trainer(overrides, run_dir)
    try:
        trainer.start()
        trainer.fit()  # one step, and a first save that warms DCP's code paths up
        pieces = trainer.parallel.state_pieces()
        found["parameters"] = trainer.n_params
        found["own_bytes"] = sum(p.tensor.numel() * p.tensor.element_size() for p in pieces)
        found["written_bytes"] = sum(p.tensor.numel() * p.tensor.element_size() for p in pieces if p.write)
        found["written_pieces"] = sum(p.write for p in pieces)
        trainer.state.step += 1
        found["extra_save"] = extra_memory(trainer.save_checkpoint)

        trainer.checkpointer = AsyncCheckpointer.create(world_size, rank, 60)

        def save_in_background() -> None:
            trainer.save_checkpoint()
            assert trainer.checkpointer.finished(wait=True).error is None

        for name in ("extra_async_first", "extra_async_reused"):
            trainer.state.step += 1
            found[name] = extra_memory(save_in_background)
        found["staging_allocations"] = trainer.checkpointer.staging.allocations
    finally:
        trainer.close()
    trainer = pieces = None  # the next trainer is measured without this one
    gc.collect()

    resumed = _trainer(overrides, run_dir)
    try:
        found["extra_load"] = extra_memory(resumed.start)
        found["resumed_step"] = resumed.state.step

        def whole_state() -> None:
            state = resumed.parallel.full_state()
            if rank == 0:
                torch.save(state, run_dir / "whole_state.pt")

        found["extra_full_state"] = extra_memory(whole_state)
    finally:
        resumed.close()
    return found


def measure_all(rank: int, world_size: int, root: str) -> dict:
    os.environ["PLAIT_CACHE"] = str(Path(root) / "cache")
    return {name: measure_layout(rank, world_size, overrides, Path(root) / name)
            for name, overrides in LAYOUTS.items()}


def test_saving_and_loading_take_about_each_ranks_own_share(tmp_path):
    results = run_on_ranks(4, measure_all, str(tmp_path))
    mib = 1 << 20
    for layout in LAYOUTS:
        print(f"\n{layout}: {results[0][layout]['parameters'] / 1e6:.1f}M parameters, MiB per rank")
        print("rank  own  written  save  async(first)  async(reused)  load  full_state (old path)")
        for by_rank in results:
            r = by_rank[layout]
            print(f"{r['rank']:>4} {r['own_bytes'] / mib:5.1f} {r['written_bytes'] / mib:7.1f} "
                  f"{r['extra_save'] / mib:6.1f} {r['extra_async_first'] / mib:12.1f} "
                  f"{r['extra_async_reused'] / mib:13.1f} {r['extra_load'] / mib:6.1f} "
                  f"{r['extra_full_state'] / mib:9.1f}")
    for layout in LAYOUTS:
        for by_rank in results:
            r = by_rank[layout]
            assert r["parameters"] >= 30_000_000
            assert r["resumed_step"] == 4
            limit = SLACK * r["own_bytes"] + ALLOWANCE_BYTES
            assert r["extra_save"] <= limit, (layout, r)
            assert r["extra_load"] <= limit, (layout, r)
            assert r["extra_async_first"] <= limit, (layout, r)  # the staging buffers: what it writes
            assert r["extra_async_reused"] <= limit, (layout, r)
            assert r["staging_allocations"] == r["written_pieces"], (layout, r)  # made once, then reused
            # The old path holds the whole model and optimizer on every rank.
            assert r["extra_full_state"] > r["extra_save"], (layout, r)
