"""Checkpoint files on disk: atomic writes, a manifest with checksums, validation, fallback.

A checkpoint is a directory `checkpoints/step-00000042/` holding named files and a
`manifest.json` (written last) with each file's size and sha256. It is written into a
temporary sibling directory and renamed into place, so a crash mid-write never leaves a
directory that looks complete. On resume the newest checkpoint whose files all match the
manifest is used; a corrupt one is reported and skipped, never silently replaced by a
fresh start.

Two formats: v1 (`model.pt` / `optimizer.pt`: full tensors keyed by parameter name, written by
rank 0) and v2, sharded (every rank writes its own pieces through DCP into the shared temporary
folder, rank 0 adds the small files and the manifest and commits; see sharded.py and
docs/checkpoints.md). Both load into any layout; new checkpoints are v2. A v2 checkpoint may be
written by a background thread (async_writer.py): the files and the commit are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from plait.train.rundir import json_text

FORMAT = "plait-checkpoint-v1"  # full tensors in model.pt / optimizer.pt, written by rank 0
SHARDED_FORMAT = "plait-checkpoint-v2"  # every rank's own pieces, through DCP (sharded.py)
FORMATS = (FORMAT, SHARDED_FORMAT)
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
SWAPPED_OUT = re.compile(r"^\.tmp-old-(step-\d{8})-\d+$")  # a checkpoint being replaced (_commit)
# Test-only: seconds to sleep at each stage of a sharded checkpoint's write (after the temporary
# folder is made, after the pieces are written, before the rename), so that a crash test can
# kill a job inside a write (tests/test_checkpoint_crash.py). Never set in real runs.
TEST_PAUSE_ENV = "PLAIT_TEST_CHECKPOINT_PAUSE_S"


def pause_for_tests() -> None:
    """Sleep for PLAIT_TEST_CHECKPOINT_PAUSE_S seconds if a test set it; otherwise nothing."""
    seconds = os.environ.get(TEST_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_file(path: Path, content: Any) -> None:
    """Write and fsync one file; an OSError names `path` (a full disk says where it was full)."""
    try:
        if isinstance(content, str):
            path.write_text(content)
        elif path.suffix == ".pt":
            # Through a Python file: a refused write is then an OSError, where torch's own
            # file writer would raise a RuntimeError that names neither the file nor the errno.
            with path.open("wb") as f:
                torch.save(content, f)
        else:
            path.write_text(json_text(content, indent=1, sort_keys=True))
        with path.open("rb") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except RuntimeError as exc:
        # torch.save, after a failed write, fails again finishing its zip archive and raises that
        # RuntimeError instead; the OSError behind it says what the machine refused.
        refused = exc.__context__
        while refused is not None and not isinstance(refused, OSError):
            refused = refused.__context__
        if refused is None:
            raise
        raise OSError(refused.errno, refused.strerror, str(path)) from None


def write_checkpoint(root: Path, step: int, files: dict[str, Any]) -> Path:
    """Write `files` atomically: str as text, `.pt` names via torch.save, anything else as JSON.

    When a write fails (a full disk), the temporary folder is removed and the checkpoints
    already on disk are as they were; the OSError, naming the file, goes to the caller.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        entries = {}
        for name, content in files.items():
            path = tmp / name
            _write_file(path, content)
            entries[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        _write_file(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": entries})
        _commit(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Rename the complete temporary folder into place: the step of a checkpoint becoming valid."""
    if final.exists():  # re-saving a step after a resume: swap, never leave a gap
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_leftovers(root: Path) -> None:
    """Temporary folders of checkpoints that were never committed (a crash mid-write). A crash
    between the two renames of a swap (`_commit`) leaves the replaced checkpoint as the only
    copy of its step: it is put back instead."""
    for stale in root.glob(".tmp-*") if root.is_dir() else ():
        swapped = SWAPPED_OUT.match(stale.name)
        if swapped and not (root / swapped.group(1)).exists():
            stale.rename(root / swapped.group(1))
            continue
        shutil.rmtree(stale, ignore_errors=True)


def sharded_temp_dir(root: Path, step: int) -> Path:
    """Where every rank writes its files of the checkpoint of `step` before it is committed."""
    return root / f".tmp-{step_dir_name(step)}"


def write_own_file(folder: Path, name: str, content: Any) -> dict[str, Any]:
    """One rank's own file of a sharded checkpoint, written and fsynced; its manifest entry."""
    _write_file(folder / name, content)
    return file_entry(folder / name)


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def commit_sharded(root: Path, step: int, rank_entries: dict[str, dict[str, Any]],
                   small_files: dict[str, Any]) -> Path:
    """Rank 0, once every rank's pieces are in the temporary folder (their files' entries in
    `rank_entries`): write the small files, then the manifest last, and commit. On an OSError
    the temporary folder is removed and the committed checkpoints are as they were."""
    tmp, final = sharded_temp_dir(root, step), root / step_dir_name(step)
    try:
        entries = dict(rank_entries)
        for name, content in small_files.items():
            _write_file(tmp / name, content)
            entries[name] = file_entry(tmp / name)
        entries[".metadata"] = file_entry(tmp / ".metadata")
        _write_file(tmp / MANIFEST, {"format": SHARDED_FORMAT, "step": step, "files": entries})
        pause_for_tests()  # complete but not committed: a crash here must not make it valid
        _commit(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def problem_with(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used, or None when every file matches its manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete write?)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    if manifest.get("format") not in FORMATS:
        return f"unknown format {manifest.get('format')!r}"
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and {"bytes", "sha256"} <= set(e) and "/" not in n and n not in ("", ".", "..")
            for n, e in files.items()):
        return "manifest.json is unreadable"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


def newest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the (path, reason) of each newer one that did not."""
    rejected = []
    for path in list_checkpoints(root):
        reason = problem_with(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def read_file(path: Path, name: str) -> Any:
    file = path / name
    if file.suffix == ".pt":
        return torch.load(file, map_location="cpu", weights_only=True)
    if file.suffix == ".json":
        return json.loads(file.read_text())
    return file.read_text()


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    removed = list_checkpoints(root)[keep:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
