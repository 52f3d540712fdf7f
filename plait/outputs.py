"""Files that a command writes where the user says (`-o`): checked before any work is done.

A file given with -o is never a folder and is never replaced without `--force`, so a typo
cannot destroy a model or a token file that took hours to make. The files themselves are
written with `plait.data.tokenfile.atomic_write` (temporary file, then rename), so a
failed write leaves the old file, or none, never half of one.
"""

from __future__ import annotations

from pathlib import Path

from plait.errors import PlaitError


def check_output_file(path: Path, flag: str, force: bool) -> None:
    """Raise PlaitError if `path` is a folder, or an existing file that `force` does not allow to replace."""
    if path.is_dir():
        raise PlaitError(f"{flag}: '{path}' is a directory; name a file in it")
    if path.exists() and not force:
        raise PlaitError(f"{flag}: '{path}' already exists; pass --force to overwrite it")
