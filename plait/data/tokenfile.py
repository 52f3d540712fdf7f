"""Token files: a flat array of token ids (`X.bin`) plus a JSON sidecar (`X.bin.json`).

The .bin has no header so it can be memory-mapped as is; the sidecar holds the format
version, dtype, token count, where the validation split starts, the tokenizer, and the
source. Every write is atomic (temporary file in the same folder, then `os.replace`) and
the sidecar is written last, so a reader that finds a sidecar finds a complete file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from plait.data.corpus import Corpus
from plait.data.tokenizer import Tokenizer, dtype_for_vocab, tokenizer_from_json
from plait.errors import DataError

FORMAT = "plait-tokens"
VERSION = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask; mkstemp would leave cache files owner-only.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_token_file(path: Path, ids: np.ndarray, val_start: int, tokenizer: Tokenizer, source: dict) -> None:
    """Write `ids` (any integer array) as OUT.bin + OUT.bin.json; dtype follows the vocab size."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    data = np.ascontiguousarray(ids, dtype=dtype)
    atomic_write(path, lambda f: f.write(memoryview(data)))  # no 2nd copy
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "n_tokens": int(data.size),
        "val_start": int(val_start),
        "tokenizer": json.loads(tokenizer.to_json()),
        "source": source,
    }
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=1) + "\n")


def read_sidecar(corpus: Corpus) -> dict:
    """The validated sidecar of a .bin corpus."""
    assert corpus.path is not None
    side = sidecar_path(corpus.path)
    if not side.is_file():
        raise corpus.error(f"has no sidecar '{side.name}'; make token files with plait prepare INPUT -o OUT.bin")
    try:
        meta = json.loads(side.read_text())
        ok = meta.get("format") == FORMAT and meta["dtype"] in ("uint16", "uint32")
        n_tokens, val_start = int(meta["n_tokens"]), int(meta["val_start"])
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise corpus.error(f"has a sidecar '{side.name}' that plait prepare did not write; re-run plait prepare")
    if meta["version"] > VERSION:
        raise corpus.error(f"was written by a newer plait (format version {meta['version']}); upgrade plait")
    expected = n_tokens * np.dtype(meta["dtype"]).itemsize
    actual = corpus.path.stat().st_size
    if actual != expected or not 0 <= val_start <= n_tokens:
        raise corpus.error(
            f"holds {actual:,} bytes but its sidecar says {n_tokens:,} {meta['dtype']} tokens; re-run plait prepare"
        )
    return meta


def read_token_file(corpus: Corpus) -> tuple[np.ndarray, dict, Tokenizer]:
    """Memory-map a .bin corpus: (all tokens, sidecar, tokenizer)."""
    meta = read_sidecar(corpus)
    try:
        tokenizer = tokenizer_from_json(json.dumps(meta["tokenizer"]))
    except DataError as exc:
        assert corpus.path is not None
        raise corpus.error(f"has a sidecar '{sidecar_path(corpus.path).name}' whose {exc}; "
                           "re-run plait prepare") from None
    if meta["n_tokens"] == 0:
        tokens = np.zeros(0, dtype=meta["dtype"])  # np.memmap refuses empty files
    else:
        tokens = np.memmap(corpus.path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return tokens, meta, tokenizer
