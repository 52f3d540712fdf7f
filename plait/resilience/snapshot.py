"""In-memory snapshots that outlive a worker: the job's state in the node's shared memory.

A restarted worker is a new process, so "in memory" has to mean memory that survives its
process: files in /dev/shm (tmpfs, RAM-backed, no disk I/O), per job. Every
`resilience.snapshot_every` steps the full, layout-free state (the checkpoint's format:
parameters, AdamW state, step, RNG states, config) is gathered; after that gather every rank
holds all of it, so two ranks keep a copy with no further traffic: rank 0 (the host copy)
and a buddy rank, on the next node when there is one, so that losing a whole node still
leaves a copy. Each copy is written atomically with a sha256 manifest (checkpoint.py), so a
torn or corrupted copy is detected and the other copy, or the previous snapshot, or the
newest disk checkpoint, is used instead. (Restoring reads the copy on rank 0's node, so
snapshots are taken in one-node jobs only for now: see session.py.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from plait.resilience.processes import SNAPSHOT_DIR_ENV, make_private_dir, private_shm_root
from plait.resilience.sentinel import remove_private_folder
from plait.train import checkpoint as ckpt

COPIES = ("host", "buddy")
KEEP = 2  # snapshots per copy: the newest and one to fall back on


def snapshot_root(run_dir: Path, job_id: str) -> Path:
    """The job's snapshot folder in shared memory: the same for every restart of one job, never
    shared with another job (a stale snapshot must not be resumed by a new run in the same folder).

    Under plait's launcher it is the private folder the launcher made (random name, 0700) and
    removes. Under torchrun, whose restarted workers must find it again without a launcher of
    ours, it is named after the run folder and job id inside this user's private folder
    (/dev/shm/plait-UID, 0700), where nobody else can plant a name or a symlink."""
    given = os.environ.get(SNAPSHOT_DIR_ENV)
    if given:
        return Path(given)
    key = hashlib.sha256(f"{Path(run_dir).resolve()}|{job_id}".encode()).hexdigest()[:16]
    return private_shm_root() / f"torchrun-{key}"


def buddy_rank(world_size: int, local_world_size: int) -> int:
    """The rank that keeps the second copy: the first rank of the next node, else rank 1."""
    if world_size > local_world_size:
        return local_world_size
    return 1 if world_size > 1 else 0


def write_snapshot(root: Path, copy: str, step: int, files: dict) -> Path:
    if root.parent == private_shm_root():  # torchrun's folder: (re)made private, never through a symlink
        make_private_dir(root.parent)
        make_private_dir(root)
    path = ckpt.write_checkpoint(root / copy, step, files)
    ckpt.prune(root / copy, KEEP)
    return path


def newest_valid_snapshot(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest snapshot copy that verifies (host before buddy at equal steps), and the
    (path, reason) of each newer copy that did not."""
    found = [(int(ckpt.STEP_DIR.match(p.name).group(1)), COPIES.index(copy), p)
             for copy in COPIES for p in ckpt.list_checkpoints(root / copy)]
    rejected = []
    for _, _, path in sorted(found, key=lambda item: (-item[0], item[1])):
        reason = ckpt.problem_with(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def snapshot_step(path: Path) -> int:
    return int(ckpt.STEP_DIR.match(path.name).group(1))


def remove_snapshots(root: Path) -> None:
    remove_private_folder(root)


def remove_empty(root: Path) -> None:
    """Remove the job's snapshot folder once both copies are gone (and this user's folder)."""
    try:
        root.rmdir()
    except OSError:
        return  # the other copy is still there: its writer removes the folder
    remove_private_folder(root)


def job_id() -> str:
    """The launcher's id for this job (stable across restarts), or this process's parent."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"ppid{os.getppid()}"
