"""In-memory snapshots of a job that spans several nodes: no node's loss loses a piece.

Each node keeps its snapshots in its own shared memory (snapshot.py's folder, "host" copy).
Every rank writes its pieces there as a sharded checkpoint (one DCP file per rank), then sends
the same bytes to its buddy: the rank with the same local rank on the next node, which keeps
them in its node's folder. Rank 0's DCP metadata and the small files (step, RNG states,
config) go to every node, and each node's first local rank commits its folder with the same
manifest, naming every rank's file. So a node holds its own ranks' files and the previous
node's: with two nodes, each holds the whole snapshot; with more, the survivors of any one
lost node hold every file between them.

After a restart (any world size), `complete_node_snapshots` makes the newest snapshot that the
nodes hold between them whole on every node, copying each missing file from a node that has it
(point-to-point, one file at a time); then each rank loads it from its own node's folder as a
one-node job does. DCP is used unchanged: only whole files move, never parsed.

Written here rather than with torch.distributed.checkpoint alone: DCP reads one path that every
rank can see (a shared file system); node-local memory is exactly what it cannot read across.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from plait.comm import CHECKPOINT, Comm, Group
from plait.data.tokenfile import atomic_write
from plait.parallel.pieces import Piece
from plait.train import checkpoint as ckpt
from plait.train.sharded import merged_entries, temp_folder, write_pieces

COPY = "host"  # the node's own copy (snapshot.COPIES)


def buddy_of(rank: int, world_size: int, local_world_size: int) -> int:
    """The rank that keeps a copy of `rank`'s files: the same local rank on the next node."""
    return (rank + local_world_size) % world_size


def write_node_snapshot(root: Path, step: int, pieces: list[Piece], small_files: dict[str, Any], comm: Comm,
                        world: Group, local_rank: int, local_world_size: int,
                        own_files: dict[str, Any] | None = None) -> Path:
    """Every rank: its pieces (and `own_files`) into its node's folder and a copy into its
    buddy's (collective). Returns this node's committed snapshot folder."""
    folder = root / COPY
    leader = local_rank == 0
    tmp = temp_folder(folder, step, leader, comm, world)  # one per node: each leader makes its own
    try:
        per_rank = write_pieces(tmp, pieces, comm, world, own_files)
        if world.size > local_world_size:
            _copy_to_buddy(tmp, per_rank, comm, world, local_world_size)
        # Rank 0's DCP metadata and the small files: every node commits the same checkpoint.
        metadata = (tmp / ".metadata").read_bytes() if world.rank == 0 else None
        metadata, small_files = comm.broadcast_object((metadata, small_files), 0, world, tag=CHECKPOINT)
        path = folder / ckpt.step_dir_name(step)
        if leader:
            if world.rank != 0:
                atomic_write(tmp / ".metadata", lambda f: f.write(metadata))
            path = ckpt.commit_sharded(folder, step, merged_entries(per_rank), small_files)
    finally:
        if leader and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier(world)  # every node's copy is committed before anyone moves on
    return path


def _copy_to_buddy(tmp: Path, per_rank: list[dict[str, dict[str, Any]]], comm: Comm, world: Group,
                   local_world_size: int) -> None:
    """Send this rank's files to its buddy and receive those of the rank it is buddy to, in one
    exchange around the ring of nodes (every rank sends and receives at once)."""
    rank, size = world.rank, world.size
    source = (rank - local_world_size) % size
    mine = sorted(per_rank[rank])
    theirs = sorted(per_rank[source])
    outgoing = torch.cat([_file_bytes(tmp / name) for name in mine]) if mine else torch.empty(0, dtype=torch.uint8)
    incoming = torch.empty(sum(per_rank[source][name]["bytes"] for name in theirs), dtype=torch.uint8)
    comm.send_recv_async(outgoing, buddy_of(rank, size, local_world_size), incoming, source, world,
                         tag=CHECKPOINT).wait()
    offset = 0
    for name in theirs:
        length = per_rank[source][name]["bytes"]
        atomic_write(tmp / name, lambda f: f.write(incoming[offset:offset + length].numpy().tobytes()))
        offset += length


def _file_bytes(path: Path) -> torch.Tensor:
    data = path.read_bytes()
    if not data:  # a rank whose pieces are all written by others leaves an empty file
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _listing(folder: Path) -> dict[int, dict[str, Any]]:
    """This node's committed snapshots: step -> its manifest's files and the files present (at
    the size the manifest gives; checksums are verified when the snapshot is chosen)."""
    found = {}
    for path in ckpt.list_checkpoints(folder) if folder.is_dir() else []:
        try:
            files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        present = sorted(name for name, entry in files.items()
                         if (path / name).is_file() and (path / name).stat().st_size == entry.get("bytes"))
        found[int(ckpt.STEP_DIR.match(path.name).group(1))] = {
            "files": files, "present": present, "manifest_bytes": (path / ckpt.MANIFEST).stat().st_size}
    return found


def complete_node_snapshots(root: Path, comm: Comm, world: Group, local_rank: int) -> int | None:
    """Make the newest snapshot the nodes hold between them whole on every node (collective).
    Returns its step, or None when no snapshot can be made whole."""
    folder = root / COPY
    listings = comm.all_gather_object(_listing(folder) if local_rank == 0 else None, world, tag=CHECKPOINT)
    leaders = [rank for rank, listing in enumerate(listings) if listing is not None]
    steps = sorted({step for rank in leaders for step in listings[rank]}, reverse=True)
    for step in steps:
        holders = [rank for rank in leaders if step in listings[rank]]
        files = listings[holders[0]][step]["files"]
        have = {rank: set(listings[rank][step]["present"]) if step in listings[rank] else set() for rank in leaders}
        if set(files) <= set().union(*have.values()):
            break
    else:
        return None
    # Every rank computes the same transfers, in the same order: (file, from, to).
    transfers = [(name, min(r for r in leaders if name in have[r]), rank)
                 for rank in leaders for name in sorted(files) if name not in have[rank]]
    transfers += [(ckpt.MANIFEST, holders[0], rank) for rank in leaders if step not in listings[rank]]
    target = folder / ckpt.step_dir_name(step)
    staging = folder / f".incoming-{ckpt.step_dir_name(step)}"
    receiving = world.rank in leaders and step not in listings[world.rank]
    if receiving:  # a node without this snapshot at all builds it aside, then commits it by renaming
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    for name, source, destination in transfers:
        if world.rank == source:
            comm.send_async(_file_bytes(target / name), destination, world, tag=CHECKPOINT).wait()
        elif world.rank == destination:
            size = files[name]["bytes"] if name in files else listings[source][step]["manifest_bytes"]
            buffer = torch.empty(size, dtype=torch.uint8)
            comm.recv_async(buffer, source, world, tag=CHECKPOINT).wait()
            atomic_write((staging if receiving else target) / name, lambda f: f.write(buffer.numpy().tobytes()))
    if receiving:
        os.replace(staging, target)
    comm.barrier(world)
    return step
