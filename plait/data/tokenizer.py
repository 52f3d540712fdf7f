"""Tokenizers: raw bytes (the default, no dependency) and a byte-level BPE trained locally.

Both are lossless on any text: BPE starts from all 256 byte symbols, so nothing is ever
unknown. `to_json` / `tokenizer_from_json` let a token file carry its own tokenizer.

A tokenizer may have an end-of-document token (`eos_id`) and a beginning one (`bos_id`):
`plait prepare -o DIR` ends every document with EOS (and starts it with BOS where there is
one). The byte tokenizer's EOS is id 256 (vocab 257), so byte ids stay byte values; plait's
BPE reserves `<|endoftext|>`; a tokenizers-library file brings its own special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from plait.errors import DataError

# Encoding one multi-megabyte string in a single call is slow and single-threaded;
# chunks cut at newlines let `encode_batch` use every core. 16K characters measured fastest
# (1<<20 was 4x slower). `safe_chunks` cuts where the ids do not change; `text_chunks`, which
# feeds BPE training, keeps its old cuts so that trained tokenizers stay as they were.
_CHUNK_CHARS = 1 << 14


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_json(self) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value; vocab 256, or 257 with an end-of-document token (id 256)."""

    name = "byte"
    vocab_size = 256
    bos_id: int | None = None
    eos_id: int | None = None

    def __init__(self, eos: bool = False) -> None:
        if eos:
            self.eos_id, self.vocab_size = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A model with vocab_size > 256 can sample ids that are not bytes; drop them.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "byte"} if self.eos_id is None else {"type": "byte", "eos": self.eos_id})

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


class BpeTokenizer:
    """A byte-level BPE from the `tokenizers` library (GPT-2 style pre-tokenization)."""

    name = "bpe"

    def __init__(self, inner: "object") -> None:
        self._inner = inner
        self.vocab_size: int = inner.get_vocab_size()
        self.bos_id, self.eos_id = _special_id(inner, BOS_NAMES), _special_id(inner, EOS_NAMES)

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._inner.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "tokenizers": json.loads(self._inner.to_str())})

    def encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._inner.encode_batch(chunks)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text encoded whole, in parallel (the library's threads release the GIL), without
        the tokenizer's own post-processing: plait adds BOS and EOS itself."""
        encode = getattr(self._inner, "encode_batch_fast", self._inner.encode_batch)  # fast: no offsets
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]


# Special tokens that mark a document's start and end, by the names tokenizers commonly give them.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
END_OF_TEXT = "<|endoftext|>"


def _special_id(inner: "object", names: tuple[str, ...]) -> int | None:
    special = {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
    for name in names:
        if name in special:
            return inner.token_to_id(name)
    return None


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from its `to_json`; DataError (callers add the file) if it is none."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise DataError("tokenizer is not valid JSON") from None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "byte":
        return ByteTokenizer(eos=obj.get("eos") is not None)
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


def safe_chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Pieces of about `size` characters whose encodings, concatenated, equal the whole text's.

    Each cut falls before a newline that follows a non-space character. The byte-level
    pre-tokenizer's pieces never join a non-space character to the whitespace after it, and a
    whitespace run is split only from its end, so such a cut is a piece boundary of the whole
    text and leaves both sides' pieces as they were (BPE merges only within a piece). Cutting
    after the newline, as `text_chunks` does, can split a run such as "\n\n" in two.
    """
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        while end < len(text):
            end = text.find("\n", end)
            if end < 0:
                end = len(text)
            elif not text[end - 1].isspace():
                break
            else:
                end += 1
        yield text[start:end]
        start = end


def train_bpe(chunks: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> BpeTokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (fewer if the text runs out of merges),
    special tokens (such as END_OF_TEXT) first."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HfTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    inner.train_from_iterator(chunks, trainer)
    return BpeTokenizer(inner)


def encode_array(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """Tokenise a whole corpus into one flat array, without a Python int per token for bytes."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
    if isinstance(tokenizer, BpeTokenizer):
        pieces = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_chunks(list(safe_chunks(text)))]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return np.asarray(tokenizer.encode(text), dtype=dtype)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32; DataError past what uint32 holds."""
    if vocab_size > 1 << 32:
        raise DataError(f"a vocabulary of {vocab_size:,} tokens is too large for token files (uint32 ids hold "
                        f"{1 << 32:,})")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
