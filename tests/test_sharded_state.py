"""Sharded state: each rank saves only its own boxes, and any layout loads them exactly.

A run trains two steps in layout A, saves its pieces with DCP, and reports its full state the
old way (gathered). A fresh model in layout B loads the pieces; its gathered full state must
equal A's bit for bit: parameters (fp32 masters), optimizer moments and step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_on_ranks
from plait import config as config_mod
from plait.parallel.pieces import flat_range_boxes
from plait.train.sharded import load_pieces, save_pieces, stored_tensors
from scenarios import BASE

MOE = ["model.n_experts=4", "model.top_k=2"]


def _trainer(overrides: list[str], run_dir: str):
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    cfg = config_mod.load_config("tiny", BASE + ["train.steps=2", "checkpoint.every=0"] + overrides)
    return Trainer(cfg, Path(run_dir), init_runtime(cfg))


def _full_state(trainer) -> dict:
    """Every full tensor as a numpy array: tensors would cross to the test process through
    shared memory, which a worker that has already exited cannot hand over."""
    params, optim = trainer.parallel.full_state()
    flat = {f"model/{n}": t for n, t in params.items()}
    for name, state in optim.items():
        flat.update({f"optim/{name}/{k}": v for k, v in state.items()})
    return {k: v.detach().float().cpu().numpy() for k, v in flat.items()}


def save_layout(rank: int, world_size: int, overrides: list[str], run_dir: str, checkpoint: str) -> dict | None:
    trainer = _trainer(overrides, run_dir)
    try:
        trainer.start()
        trainer.fit()
        pieces = trainer.parallel.state_pieces()
        save_pieces(Path(checkpoint), pieces, dist.group.WORLD)
        written = sum(p.tensor.numel() * p.tensor.element_size() for p in pieces if p.write)
        full = _full_state(trainer)
    finally:
        trainer.close()
    return {"full": full, "written": written} if rank == 0 else {"written": written}


def load_layout(rank: int, world_size: int, overrides: list[str], run_dir: str, checkpoint: str) -> dict | None:
    trainer = _trainer(overrides, run_dir)
    try:
        stored = {k: (tuple(v.size), v.properties.dtype) for k, v in stored_tensors(Path(checkpoint)).items()}
        pieces, finish = trainer.parallel.load_targets(stored)
        load_pieces(Path(checkpoint), pieces, dist.group.WORLD)
        finish()
        full = _full_state(trainer)
    finally:
        trainer.close()
    return full if rank == 0 else None


CASES = {
    "dp4_zero3_to_1": ((4, ["parallel.zero=3"]), (1, [])),
    "tp2_pp2_zero1_to_dp2_zero2": ((4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero=1"]),
                                   (2, ["parallel.zero=2"])),
    "1_to_tp2_cp2": ((1, []), (4, ["parallel.tp=2", "parallel.cp=2"])),
    "moe_ep2_zero1_to_ep4": ((4, MOE + ["parallel.ep=2", "parallel.zero=1"]), (4, MOE + ["parallel.ep=4"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_any_layout_loads_what_another_saved_exactly(tmp_path, case):
    (world_a, layout_a), (world_b, layout_b) = CASES[case]
    checkpoint = str(tmp_path / "checkpoint")
    saved = run_on_ranks(world_a, save_layout, layout_a, str(tmp_path / "a"), checkpoint)
    loaded = run_on_ranks(world_b, load_layout, layout_b, str(tmp_path / "b"), checkpoint)[0]
    check_loaded_exactly_and_written_once(saved, loaded)


def check_loaded_exactly_and_written_once(saved: list[dict], loaded: dict) -> None:
    """The loaded state equals the saved one bit for bit, and every element was written once:
    the ranks' pieces add up to the state, no replica twice. (The gathered state repeats the
    optimizer's step per parameter; a checkpoint holds it once.)"""
    reference = saved[0]["full"]
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert (loaded[key] == value).all(), key
    steps = [v for k, v in reference.items() if k.endswith("/step")]
    state_bytes = sum(v.nbytes for k, v in reference.items() if not k.endswith("/step")) + steps[0].nbytes
    assert sum(r["written"] for r in saved) == state_bytes


def test_a_flat_range_is_a_few_contiguous_boxes():
    full = torch.arange(4 * 3 * 5).view(4, 3, 5)
    for start, stop in [(0, 60), (7, 8), (7, 53), (15, 45), (14, 16)]:
        boxes = flat_range_boxes((4, 3, 5), start, stop)
        seen = [full[tuple(slice(o, o + s) for o, s in zip(off, size))].flatten() for off, size in boxes]
        assert torch.cat(seen).tolist() == list(range(start, stop))
        assert len(boxes) <= 2 * 3 - 1  # at most a partial and a whole run per dimension, one middle
