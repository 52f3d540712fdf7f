"""Files that a command writes where the user says (`-o`): checked before any work is done.

A file given with -o is never a folder and is never replaced without `--force`, so a typo
cannot destroy a model or a token file that took hours to make. The files themselves are
written with `plait.data.tokenfile.atomic_write` (temporary file, then rename), so a
failed write leaves the old file, or none, never half of one.
"""

from __future__ import annotations

import re
from pathlib import Path

from plait.errors import ConfigError, PlaitError

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?$", re.IGNORECASE)


def check_output_file(path: Path, flag: str, force: bool) -> None:
    """Raise PlaitError if `path` is a folder, or an existing file that `force` does not allow to replace."""
    if path.is_dir():
        raise PlaitError(f"{flag}: '{path}' is a directory; name a file in it")
    if path.exists() and not force:
        raise PlaitError(f"{flag}: '{path}' already exists; pass --force to overwrite it")


def parse_size(text: str | int) -> int:
    """Bytes in `text`: a number of bytes, or with a unit: KB, MB, GB, TB (powers of 1000, as
    transformers counts them) or KiB, MiB, GiB, TiB (powers of 1024). ConfigError otherwise,
    also when argparse calls it (`type=`): a PlaitError passes through argparse to the CLI's
    one-line report."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text.strip())
        if not match:
            raise ConfigError(f"--max-shard-size {text!r} is not a size: give bytes or e.g. 500MB, 2GB, 1GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size < 1:
        raise ConfigError(f"--max-shard-size {text!r} must be at least one byte")
    return size
