"""The run directory as a whole: which folders may be trained into, one writer at a time,
and how its JSON files are written.

A run directory has exactly one writer: the top process of the job holds an exclusive
`flock` on `.plait.lock` for the run's life (for `plait train --nproc N` the launcher, which
tells its workers through PLAIT_RUN_DIR_LOCKED; under torchrun global rank 0; otherwise the
process itself). The lock file names its holder (pid and host). The kernel drops the lock
when the holder dies, so a lock file left by a killed run is stale and is taken over with a
warning; a clean exit removes it.

A folder is a plait run when it holds the marker `.plait-run` (written at a run's first
start), or, for runs older than the marker, a `config.toml` with plait's sections beside
metrics.jsonl, events.jsonl or checkpoints/. Training into any other non-empty folder
needs `--force`, so a user's folder is never overwritten without a word.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

LOCK_FILE = ".plait.lock"
MARKER_FILE = ".plait-run"
MARKER_FORMAT = "plait-run-v1"
# Set by a launcher that holds the lock for its workers: the absolute run directory.
LOCKED_ENV = "PLAIT_RUN_DIR_LOCKED"
# What a legacy run (before the marker) always wrote beside its config.toml, one at least.
LEGACY_RUN_FILES = ("metrics.jsonl", "events.jsonl", "checkpoints")


# --- JSON --------------------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_text(value: Any, **options: Any) -> str:
    """json.dumps for files plait writes: strict JSON, so NaN and Infinity become null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


# --- what a folder is --------------------------------------------------------------------------
def is_plait_run(folder: Path) -> bool:
    """Whether `folder` (an existing directory) was written by plait training."""
    if (folder / MARKER_FILE).is_file():
        return True
    # plait's checkpoints (step folders with a manifest) mark a run folder, with or without the rest.
    if any((step / "manifest.json").is_file() for step in (folder / "checkpoints").glob("step-*")):
        return True
    config = folder / "config.toml"
    if not config.is_file() or not any((folder / name).exists() for name in LEGACY_RUN_FILES):
        return False
    try:
        sections = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return isinstance(sections.get("model"), dict) and isinstance(sections.get("train"), dict)


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Raise PlaitError when `run_dir` must not be trained into: a file, or a non-empty folder
    that is not a plait run (unless `force`). Reads only."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise PlaitError(f"--run-dir {run_dir} is a broken symbolic link")
    if run_dir.exists() and not run_dir.is_dir():
        raise PlaitError(f"--run-dir {run_dir} is a file, not a folder")
    if not run_dir.is_dir() or force:
        return
    entries = {entry.name for entry in run_dir.iterdir()}
    if entries - {LOCK_FILE} and not is_plait_run(run_dir):
        raise PlaitError(
            f"--run-dir {run_dir} is a non-empty folder that is not a plait run; "
            "use another folder, or plait train --force to write into it anyway"
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step: a failed write (a full disk) leaves the old file
    whole and no temporary file behind; the OSError names `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def write_marker(run_dir: Path) -> None:
    """Mark `run_dir` as a plait run (once; called after the run's start was accepted)."""
    marker = run_dir / MARKER_FILE
    if not marker.exists():
        write_text_atomic(marker, json_text({"format": MARKER_FORMAT, "created": time.time()}) + "\n")


# --- one writer --------------------------------------------------------------------------------
def _holder_text() -> str:
    return json_text({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n"


def describe_holder(text: str) -> str:
    """`pid 123 on host node7` from a lock file's content (or what can be read of it)."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (unreadable lock file)"


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class RunDirLock:
    """The exclusive claim on a run directory; release() (or leaving the `with`) gives it up."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self.path, self._fd = run_dir, run_dir / LOCK_FILE, fd
        self.previous_holder: str | None = None  # the holder of a stale lock taken over, if any
        self._created = created  # folders the claim made, deepest first
        self._shared = False

    def share_with_workers(self) -> None:
        """Tell the worker processes this launcher starts (they inherit the environment) that it
        holds their run directory, so they do not try to lock it themselves."""
        os.environ[LOCKED_ENV] = str(self.run_dir.resolve())
        self._shared = True

    def release(self) -> None:
        if self._shared:
            os.environ.pop(LOCKED_ENV, None)
            self._shared = False
        if self._fd is None:
            return
        try:
            # Removed while still held: a process waiting on this file re-checks that the path
            # still names what it locked (_take_lock), so no two can both hold the directory.
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except OSError:
            pass  # the lock file is gone or unreachable: the lock itself ends with the close
        finally:
            os.close(self._fd)
            self._fd = None
        # A run that ended before writing anything (bad config, refused resume) leaves no folder.
        _remove_if_empty(self._created)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def claim_run_dir(run_dir: Path, force: bool = False) -> RunDirLock:
    """Check `run_dir`, create it, and take its lock for this process.

    Raises PlaitError when the folder may not be used or another live process holds it; an
    OSError (with its filename) when the machine refuses (unwritable, read-only, disk full).
    """
    check_run_dir(run_dir, force)
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = _take_lock(run_dir)
    except BaseException:
        _remove_if_empty(created)
        raise
    lock = RunDirLock(run_dir, fd, created)
    try:
        previous = _read_fd(fd).strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, _holder_text().encode())
    except OSError as exc:
        lock.release()
        raise OSError(exc.errno, exc.strerror, str(lock.path)) from None
    if previous:
        lock.previous_holder = describe_holder(previous)
        print(f"plait: warning: taking over the lock of {run_dir} left by {lock.previous_holder}, "
              "which is no longer running", file=sys.stderr, flush=True)
    return lock


def _take_lock(run_dir: Path) -> int:
    """An open descriptor of run_dir/.plait.lock that holds its exclusive flock."""
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_fd(fd))
            os.close(fd)
            raise PlaitError(f"--run-dir {run_dir} is in use by plait {holder}; "
                             "wait for that run to end or use another --run-dir") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have removed the file between our open and our lock: then
        # we hold a lock on a file nobody else will ever open, and must try again.
        try:
            still_there = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_there = False
        if still_there:
            return fd
        os.close(fd)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: something was written into it


def held_by_launcher(run_dir: Path) -> bool:
    """Whether the launcher that started this worker holds the lock on `run_dir` for it."""
    return os.environ.get(LOCKED_ENV) == str(run_dir.resolve())
