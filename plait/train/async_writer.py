"""Checkpoints written in the background (`checkpoint.async_save`, the default where it is safe).

At a checkpoint step each rank copies the pieces it writes (`Piece.write`) into host staging
buffers and training goes on; a writer thread then does exactly what a synchronous save does
(`write_sharded_checkpoint`: DCP writes every rank's pieces, each rank hashes its own file,
rank 0 adds the small files and the manifest last and commits by renaming the folder), and
rank 0 prunes old checkpoints once the new one is committed.

- One process group of its own: the writer's collectives (DCP's plans and results, the
  gathers of checksums and failures, barriers) run on a gloo group made for checkpoints alone,
  so they never interleave with the training's collectives, which go on meanwhile on the
  training's groups. The writer has its own `Comm` too: the trainer's calls its observers
  (tracing, the watchdog) and fault injection's hooks, which belong to the training thread.
- Staging buffers are kept from one checkpoint to the next (keyed by tensor and box): a
  rank's host memory holds one more copy of what it writes, allocated once (again only when
  a box changes shape); pinned when the state is on a GPU, so the copies leave the GPU
  without blocking it and the writer waits for them.
- At most one checkpoint in flight: the next one, the end of training (`fit`), a resume and
  `Trainer.close` (so also an elastic regroup, which closes the trainer) first wait for the
  previous to be committed. A failure (a full disk) is kept until the next wait and raised
  there, the same error on every rank, as the synchronous path raises it.
- A crash or SIGKILL at any moment leaves the previous checkpoint the newest valid one: only
  the rename commits. The uncommitted folder is removed at the next start. The price of not
  waiting: a crash in the few steps while a checkpoint is written resumes from the one before.

The trainer keeps the synchronous path for a single process, and for local SGD and compressed
gradients (trainer.py, `Trainer._checkpoint_writer`, says why).
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.comm import Comm, Group
from plait.parallel.pieces import Piece
from plait.train import checkpoint as ckpt
from plait.train.sharded import write_sharded_checkpoint

GROUP_NAME = "checkpoint"


@dataclass
class Written:
    """What became of one checkpoint: its path and the checkpoints pruned after it, or the error."""

    step: int
    path: Path | None = None
    pruned: list[str] = field(default_factory=list)
    seconds: float = 0.0  # a background write: from the staging copy to the commit
    background: bool = False
    error: BaseException | None = None


class StagingBuffers:
    """Host copies of the pieces a rank writes, reused from one checkpoint to the next."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.allocations = 0  # buffers made so far (tests check that they are reused)

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def stage(self, pieces: list[Piece]) -> tuple[list[Piece], torch.cuda.Event | None]:
        """Copy every written piece into its buffer; returns the staged pieces (tensors of their
        own, which training does not touch) and, for GPU state, the event that marks the copies
        done (they run on the training's stream, ahead of whatever changes the state next)."""
        kept: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        staged: list[Piece] = []
        on_gpu = any(p.write and p.tensor.is_cuda for p in pieces)
        for piece in pieces:
            if not piece.write:
                continue
            source = piece.tensor.detach()
            index = (piece.key, tuple(piece.offsets))
            buffer = self.buffers.get(index)
            if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
                buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=on_gpu)
                self.allocations += 1
            buffer.copy_(source, non_blocking=source.is_cuda)
            kept[index] = buffer
            staged.append(Piece(piece.key, piece.full_shape, piece.offsets, buffer, True))
        self.buffers = kept  # boxes no longer written are let go
        copied = None
        if on_gpu:
            copied = torch.cuda.Event()
            copied.record()
        return staged, copied


class AsyncCheckpointer:
    """One rank's background checkpoint writer over its own process group (see the module docstring)."""

    def __init__(self, group: Group):
        self.group = group
        self.comm = Comm()  # the writer thread's own accounting, hooks and sequence numbers
        self.staging = StagingBuffers()
        self._thread: threading.Thread | None = None
        self._written: Written | None = None

    @staticmethod
    def create(world_size: int, rank: int, timeout_s: float) -> "AsyncCheckpointer":
        """Make the checkpoint group (collective: every rank calls it, in the same order relative
        to its other new_group calls)."""
        process_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return AsyncCheckpointer(Group(GROUP_NAME, list(range(world_size)), rank, process_group))

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def start(self, root: Path, step: int, pieces: list[Piece], small_files: dict[str, Any], keep: int) -> None:
        """Stage this rank's pieces and write the checkpoint of `step` in the background. The
        previous one must have been collected (`finished(wait=True)`): its buffers are reused."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint is still being written")
        started = time.perf_counter()
        staged, copied = self.staging.stage(pieces)
        self._thread = threading.Thread(target=self._write, name=f"plait-checkpoint-{step}", daemon=True,
                                        args=(root, step, staged, copied, small_files, keep, started))
        self._thread.start()

    def _write(self, root: Path, step: int, staged: list[Piece], copied: torch.cuda.Event | None,
               small_files: dict[str, Any], keep: int, started: float) -> None:
        written = Written(step, background=True)
        try:
            if copied is not None:
                copied.synchronize()
            written.path = write_sharded_checkpoint(root, step, staged, small_files, self.comm, self.group)
            if self.group.rank == 0:
                written.pruned = [p.name for p in ckpt.prune(root, keep)]
        except BaseException as exc:  # noqa: BLE001 - kept for the training thread, which raises it
            written.error = exc
        written.seconds = time.perf_counter() - started
        self._written = written

    def finished(self, wait: bool) -> Written | None:
        """The checkpoint in flight once it is done (None if there is none, or, without `wait`,
        while it is still being written). Without `wait` a failed write is not handed over:
        it stays for the next wait, which every rank reaches at the same step, and raises there."""
        if self._thread is None:
            return None
        if not wait and (self._thread.is_alive() or (self._written is not None and self._written.error)):
            return None
        self._thread.join()
        self._thread = None
        written, self._written = self._written, None
        return written

