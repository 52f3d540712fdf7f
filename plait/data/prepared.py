"""Prepared corpus folders (`plait prepare INPUT... -o DIR`): token shards, document index, manifest.

    DIR/manifest.json           format, version, dtype, tokenizer, per split its shards (file,
                                tokens, sha256), document and token counts, the sources (sha256,
                                documents, bad records skipped), the options; written last
    DIR/train-00000.bin ...     the training split's tokens, concatenated documents, no header
    DIR/train.idx               uint64 little-endian: the end offset of each training document
                                in the split's token stream (a document may cross shards)
    DIR/val-00000.bin, val.idx  the same for the validation split
    DIR/tokenizer.json          the tokenizer, as the manifest holds it (`--tokenizer` takes it)

docs/data.md describes the format and why it is plait's own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from plait.data.tokenizer import Tokenizer, tokenizer_from_json
from plait.errors import DataError

FORMAT = "plait-corpus"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


class SplitWriter:
    """Appends documents' tokens to one split's shards and index, hashing each shard as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._digest = hashlib.sha256()
        self._in_shard = 0
        self._index = open(folder / f"{split}.idx", "wb")

    def append(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Add documents: their tokens concatenated, and each one's length."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        ends = self.tokens + np.cumsum(doc_lengths, dtype=np.uint64)
        self._index.write(ends.astype("<u8").tobytes())
        self.documents += len(doc_lengths)
        start = 0
        while start < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens) - start, self.shard_tokens - self._in_shard)
            piece = memoryview(tokens[start:start + take].astype(self.dtype.newbyteorder("<"), copy=False))
            self._file.write(piece)
            self._digest.update(piece)
            self._in_shard += take
            start += take
        self.tokens += len(tokens)

    def _next_shard(self) -> None:
        self._close_shard()
        self._file = open(self.folder / f"{self.split}-{len(self.shards):05d}.bin", "wb")
        self._digest, self._in_shard = hashlib.sha256(), 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards.append({"file": Path(self._file.name).name, "tokens": self._in_shard,
                                "sha256": self._digest.hexdigest()})
            self._file = None

    def close(self) -> dict:
        """Finish the split; its manifest entry."""
        self._close_shard()
        self._index.close()
        return {"tokens": self.tokens, "documents": self.documents, "index": f"{self.split}.idx",
                "shards": self.shards}


class TokenStream:
    """Several token arrays read as one: windows may cross from one part into the next."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts], dtype=np.int64)
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] int64: tokens start .. start + length - 1 of each start."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(np.asarray(starts, dtype=np.int64)):
            if start < 0 or start + length > len(self):
                raise IndexError(f"window {start}..{start + length} outside {len(self)} tokens")
            filled, part = 0, int(np.searchsorted(self.offsets, start, side="right")) - 1
            while filled < length:
                begin = start + filled - self.offsets[part]
                take = min(length - filled, len(self.parts[part]) - begin)
                out[row, filled:filled + take] = self.parts[part][begin:begin + take]
                filled, part = filled + take, part + 1
        return out

    def to_numpy(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return self.to_numpy().tolist()


def tokens_of(parts: list[np.ndarray]) -> np.ndarray | TokenStream:
    """One array read as is; several as a TokenStream."""
    parts = [p for p in parts if len(p)]
    if len(parts) == 1:
        return parts[0]
    return TokenStream(parts) if parts else np.zeros(0, dtype=np.uint16)


def read_manifest(folder: Path, field: str = "data.corpus") -> dict:
    """The validated manifest of a prepared folder; DataError naming what is wrong."""
    where = f"{field}: '{folder}'"
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        ok = meta.get("format") == FORMAT and meta["dtype"] in ("uint16", "uint32") and \
            all(isinstance(meta["splits"][s]["shards"], list) for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"{where} has a {MANIFEST} that plait prepare did not write; re-run plait prepare")
    if meta["version"] > VERSION:
        raise DataError(f"{where} was written by a newer plait (format version {meta['version']}); upgrade plait")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            path = folder / shard["file"]
            if Path(shard["file"]).name != shard["file"] or not path.is_file() \
                    or path.stat().st_size != shard["tokens"] * itemsize:
                raise DataError(f"{where} has a missing or truncated shard '{shard['file']}' "
                                f"({shard['tokens']:,} {meta['dtype']} tokens expected); re-run plait prepare")
    return meta


def load_prepared(folder: Path, field: str = "data.corpus") -> tuple[list[np.ndarray], list[np.ndarray], dict, Tokenizer]:
    """Memory-map a prepared folder: (train shards, validation shards, manifest, tokenizer)."""
    meta = read_manifest(folder, field)
    try:
        tokenizer = tokenizer_from_json(json.dumps(meta["tokenizer"]))
    except DataError as exc:
        raise DataError(f"{field}: '{folder}' has a manifest whose {exc}; re-run plait prepare") from None
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    splits = [[np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
               for s in meta["splits"][split]["shards"] if s["tokens"]] for split in SPLITS]
    return splits[0], splits[1], meta, tokenizer


def document_ends(folder: Path, split: str) -> np.ndarray:
    """The end offset of every document of a split in its token stream, uint64."""
    return np.fromfile(folder / f"{split}.idx", dtype="<u8")
