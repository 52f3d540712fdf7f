"""In-memory snapshots that outlive a worker: the job's state in the node's shared memory.

A restarted worker is a new process, so "in memory" has to mean memory that survives its
process: files in /dev/shm (tmpfs, RAM-backed, no disk I/O), per job. Every
`resilience.snapshot_every` steps every rank writes its own pieces of the layout-free state
(parameters, optimizer state; the sharded checkpoint format of plait/train/sharded.py, so no
rank ever gathers the model) into the job's folder, and rank 0 adds the step, RNG states and
config and commits it with a sha256 manifest (checkpoint.py): a torn or corrupted snapshot is
detected and the previous one, or the newest disk checkpoint, is used instead. The folder is
the node's shared memory, so snapshots are taken in one-node jobs only for now (session.py);
`buddy_rank` and the "buddy" copy serve the whole-state snapshots of `write_snapshot`.
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


def prepare_snapshot_root(root: Path) -> None:
    if root.parent == private_shm_root():  # torchrun's folder: (re)made private, never through a symlink
        make_private_dir(root.parent)
        make_private_dir(root)


def write_snapshot(root: Path, copy: str, step: int, files: dict) -> Path:
    """A whole-state snapshot written by one rank (the sharded ones are written by every rank
    with sharded.write_sharded_checkpoint into root / "host")."""
    prepare_snapshot_root(root)
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
