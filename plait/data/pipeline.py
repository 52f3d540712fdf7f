"""Streaming tokenisation of many sources into a prepared folder's splits.

A reader thread walks the sources' documents and hands batches of them (about a megabyte of
text each) through a short queue, so memory holds a few batches whatever the corpus's size.
The main thread encodes each batch with the tokenizers library's batch encoder, whose own
threads (`--workers` of them) release the GIL, so reading and parsing overlap encoding. Each
document is encoded whole, then framed as [BOS] ids EOS. Document i (counted over all sources
in order) goes to validation when floor((i + 1) f + 1/2) > floor(i f + 1/2): one in every 1/f,
spread evenly, the same whatever the batch sizes or worker count.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from plait.data.prepared import SplitWriter
from plait.data.sources import Source, documents
from plait.data.tokenizer import Tokenizer

BATCH_CHARS = 1 << 20
BATCH_DOCS = 4096
_QUEUE_BATCHES = 4
_PROGRESS_EVERY_S = 2.0


def is_validation(ordinals: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which of these document ordinals (0-based, over the whole corpus) are held out."""
    i = np.asarray(ordinals, dtype=np.float64)
    return np.floor((i + 1) * val_fraction + 0.5) > np.floor(i * val_fraction + 0.5)


def iter_documents(sources: list[Source], text_field: str, encoding: str, skip_bad: bool) -> Iterator[str]:
    for source in sources:
        yield from documents(source, text_field, encoding, skip_bad)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_ahead(batches: Iterator[list[str]]) -> Iterator[list[str]]:
    """`batches`, produced by a background thread at most _QUEUE_BATCHES ahead."""
    handoff: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        handoff.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            handoff.put(exc)

    thread = threading.Thread(target=produce, name="plait-prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Progress:
    """Progress lines on stderr: documents, bytes, tokens/s, ETA (a rewritten line on a terminal)."""

    def __init__(self, total_bytes: int, done_bytes: Callable[[], float], label: str = "plait prepare",
                 stream=None, enabled: bool = True) -> None:
        self.total, self.done_bytes, self.label = total_bytes, done_bytes, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.start = time.monotonic()
        self.last = self.start
        self.documents = 0
        self.tokens = 0

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            self._say(end="\r" if self.tty else "\n")

    def finish(self) -> float:
        """Print the final line; return the seconds taken."""
        if self.enabled:
            self._say(end="\n", final=True)
        return time.monotonic() - self.start

    def _say(self, end: str, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = self.total if final else min(self.done_bytes(), self.total)
        share = done / self.total if self.total else 1.0
        eta = "done" if final else (_clock(elapsed * (1 - share) / share) if share > 0 else "?")
        line = (f"{self.label}: {self.documents:,} documents, {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB "
                f"({share:.0%}), {self.tokens:,} tokens, {self.tokens / elapsed / 1e6:.2f}M tokens/s, "
                f"{_clock(elapsed)} elapsed, ETA {eta}")
        self.stream.write(line + end)
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _frame(encoded: list, bos: int | None, eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids framed as [BOS] ids EOS and concatenated; (tokens, each document's length)."""
    extra = 1 + (bos is not None)
    lengths = np.fromiter((len(ids) + extra for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    position = 0
    for ids, length in zip(encoded, lengths):
        if bos is not None:
            flat[position] = bos
        flat[position + extra - 1:position + length - 1] = ids
        flat[position + length - 1] = eos
        position += length
    return flat, lengths


def encode_into(sources: list[Source], tokenizer: Tokenizer, writers: dict[str, SplitWriter], *, text_field: str,
                encoding: str, skip_bad: bool, val_fraction: float, progress: Progress) -> None:
    """Tokenise every document of `sources` into the train and val writers."""
    assert tokenizer.eos_id is not None
    dtype = writers["train"].dtype
    ordinal = 0
    for batch in _read_ahead(_batches(iter_documents(sources, text_field, encoding, skip_bad))):
        encoded = tokenizer.encode_batch(batch)  # type: ignore[attr-defined]
        held_out = is_validation(np.arange(ordinal, ordinal + len(batch)), val_fraction)
        ordinal += len(batch)
        total = 0
        for split, chosen in (("train", ~held_out), ("val", held_out)):
            picked = [ids for ids, keep in zip(encoded, chosen) if keep]
            if picked:
                tokens, lengths = _frame(picked, tokenizer.bos_id, tokenizer.eos_id, dtype)
                writers[split].append(tokens, lengths)
                total += len(tokens)
        progress.update(len(batch), total)
