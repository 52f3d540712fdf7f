"""In-memory snapshots across nodes (plait/resilience/node_snapshot.py), on 4 gloo processes
playing 2 nodes of 2, each node with its own shared-memory folder:

- every node's folder holds its own ranks' files and its buddy node's, so each holds the whole
  snapshot with 2 nodes, and every file verifies against the one manifest;
- after one node's folder is lost, the survivors (2 ranks, one node) find the snapshot whole
  and load it: every box equals what was saved;
- a fresh node joining (its folder empty) receives the missing files and loads the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from plait.comm import Comm, Group
from plait.parallel.pieces import Piece
from plait.resilience.node_snapshot import buddy_of, complete_node_snapshots, write_node_snapshot
from plait.train import checkpoint as ckpt
from plait.train.sharded import load_pieces
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.timeout(300)

ROWS, COLS = 8, 6


def full_tensor(step: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 1000 * step


def world_group(rank: int, world_size: int) -> Group:
    import torch.distributed as dist

    return Group("world", list(range(world_size)), rank, dist.group.WORLD)


def node_root(base: str, rank: int, local_world_size: int) -> Path:
    return Path(base) / f"node{rank // local_world_size}"


def save(rank: int, world_size: int, base: str) -> list[str]:
    """Each rank owns ROWS / world_size rows of one tensor; snapshots at steps 2 and 4."""
    comm, world = Comm(), world_group(rank, world_size)
    rows = ROWS // world_size
    for step in (2, 4):
        mine = full_tensor(step)[rank * rows:(rank + 1) * rows].clone()
        pieces = [Piece("model/w", (ROWS, COLS), (rank * rows, 0), mine, True)]
        small = {"trainer.json": {"step": step}} if rank == 0 else {}
        path = write_node_snapshot(node_root(base, rank, 2), step, pieces, small, comm, world,
                                   local_rank=rank % 2, local_world_size=2)
    return sorted(p.name for p in path.iterdir())


def restore(rank: int, world_size: int, base: str, local_world_size: int) -> tuple[int | None, list[float]]:
    comm, world = Comm(), world_group(rank, world_size)
    root = node_root(base, rank, local_world_size)
    step = complete_node_snapshots(root, comm, world, local_rank=rank % local_world_size)
    path = root / "host" / ckpt.step_dir_name(step)
    assert ckpt.problem_with(path) is None, ckpt.problem_with(path)
    rows = ROWS // world_size
    mine = torch.empty(rows, COLS)
    load_pieces(path, [Piece("model/w", (ROWS, COLS), (rank * rows, 0), mine, True)], world.process_group)
    expected = full_tensor(step)[rank * rows:(rank + 1) * rows]
    return step, float((mine - expected).abs().max())


def test_buddy_is_the_same_local_rank_on_the_next_node():
    assert [buddy_of(r, 4, 2) for r in range(4)] == [2, 3, 0, 1]
    assert [buddy_of(r, 6, 2) for r in range(6)] == [2, 3, 4, 5, 0, 1]


def test_a_node_lost_loses_no_snapshot_and_a_new_node_is_filled_in(tmp_path):
    base = str(tmp_path)
    names = run_on_ranks(4, save, base)[0]
    assert {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", ".metadata", "manifest.json",
            "trainer.json"} <= set(names)
    for node in ("node0", "node1"):  # both nodes hold the whole snapshot, each verifying
        for step in (2, 4):
            assert ckpt.problem_with(tmp_path / node / "host" / ckpt.step_dir_name(step)) is None
    shutil.rmtree(tmp_path / "node1")  # node 1 is lost, with its shared memory
    assert run_on_ranks(2, restore, base, 2) == [(4, 0.0), (4, 0.0)]
    (tmp_path / "node1").mkdir()  # node 1 comes back with empty memory: it is sent the snapshot
    assert run_on_ranks(4, restore, base, 2) == [(4, 0.0)] * 4
    assert ckpt.problem_with(tmp_path / "node1" / "host" / ckpt.step_dir_name(4)) is None
    shutil.rmtree(tmp_path / "node1")
    # Node 1 comes back empty; node 0 keeps only step 2 and half of step 4's files.
    for name in ("__0_0.distcp", "__2_0.distcp"):
        (tmp_path / "node0" / "host" / ckpt.step_dir_name(4) / name).unlink()
    shutil.copytree(tmp_path / "node0", tmp_path / "node1")  # ... and node 1 holds the same half
    (tmp_path / "node1" / "host" / ckpt.step_dir_name(4) / "__1_0.distcp").unlink()
    (tmp_path / "node1" / "host" / ckpt.step_dir_name(4) / "__3_0.distcp").unlink()
    # Step 4's files are nowhere whole: step 2 is the newest that can be made whole.
    assert run_on_ranks(4, restore, base, 2) == [(2, 0.0)] * 4
