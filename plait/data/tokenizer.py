"""Tokenizers: raw bytes (the default, no dependency) and a byte-level BPE trained locally.

Both are lossless on any text: BPE starts from all 256 byte symbols, so nothing is ever
unknown. `to_json` / `tokenizer_from_json` let a token file carry its own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from plait.errors import DataError

# Encoding one multi-megabyte string in a single call is slow and single-threaded;
# chunks cut at newlines let `encode_batch` use every core.
# 16K characters measured fastest (1<<20 was 4x slower). Changing it changes token files.
_CHUNK_CHARS = 1 << 14


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_json(self) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value; vocab 256."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A model with vocab_size > 256 can sample ids that are not bytes; drop them.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})


class BpeTokenizer:
    """A byte-level BPE from the `tokenizers` library (GPT-2 style pre-tokenization)."""

    name = "bpe"

    def __init__(self, inner: "object") -> None:
        self._inner = inner
        self.vocab_size: int = inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._inner.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "tokenizers": json.loads(self._inner.to_str())})

    def encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._inner.encode_batch(chunks)]


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from its `to_json`; DataError (callers add the file) if it is none."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise DataError("tokenizer is not valid JSON") from None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HfTokenizer

        try:
            return BpeTokenizer(HfTokenizer.from_str(json.dumps(obj.get("tokenizers"))))
        except Exception as exc:  # the library raises a bare Exception for a malformed definition
            reason = (str(exc).splitlines() or ["malformed"])[0]
            raise DataError(f"bpe tokenizer does not load ({reason})") from None
    raise DataError(f"tokenizer type {kind!r} is unknown (plait knows byte and bpe)")


def text_chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Split at newlines into pieces of about `size` characters; concatenated they give `text`."""
    start = 0
    while start < len(text):
        end = text.find("\n", min(start + size, len(text)))
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_bpe(chunks: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (fewer if the text runs out of merges)."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HfTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    inner.train_from_iterator(chunks, trainer)
    return BpeTokenizer(inner)


def encode_array(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """Tokenise a whole corpus into one flat array, without a Python int per token for bytes."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
    if isinstance(tokenizer, BpeTokenizer):
        pieces = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_chunks(list(text_chunks(text)))]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return np.asarray(tokenizer.encode(text), dtype=dtype)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
