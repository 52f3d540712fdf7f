"""From a `data.corpus` spec to memory-mapped train/validation token arrays.

Caches, all keyed by the corpus's content hash and written atomically:
  text-<fingerprint>.json                      content hash of the decoded text, so a warm
                                               start needs only a stat of each source file
  <name>-<hash>-bpe<V>-f<F>.tokenizer.json     the trained BPE (byte needs none)
  <name>-<hash>-<byte|bpeV>-f<F>.bin(.json)    the token file, same format as `plait prepare`
They live in data.cache_dir, $PLAIT_CACHE or ~/.cache/plait, never beside the input (whose
folder may be shared, read-only or a system folder). Cache folders are created owner-only
(0700), and one that is a symbolic link is refused rather than written through (someone else
could have planted it).

One process builds a missing cache while every other process that needs it waits on a file
lock in the cache folder (`<corpus key>.lock`), saying so every little while: under torchrun the
other ranks wait there, not in a collective bounded by parallel.timeout_s.

A prepared folder (`plait prepare INPUT... -o DIR`) and a .bin token file need no cache.
`data.mix` trains on several corpora at once, each named as data.corpus names one, all with
the same tokenizer; plait/data/sampler.py draws from them by weight.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from plait.config import DataConfig
from plait.data.corpus import (
    SHAKESPEARE_BYTES,
    SHAKESPEARE_SHA256,
    Corpus,
    check_text_nonempty,
    fingerprint,
    read_text,
    resolve_corpus,
)
from plait.data.prepared import TokenStream, load_prepared, read_manifest, tokens_of
from plait.data.tokenfile import atomic_write_text, read_sidecar, read_token_file, sidecar_path, write_token_file
from plait.data.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    dtype_for_vocab,
    encode_array,
    text_chunks,
    tokenizer_from_json,
    train_bpe,
)
from plait.errors import DataError


@dataclass
class PreparedData:
    train: np.ndarray | TokenStream
    val: np.ndarray | TokenStream
    tokenizer: Tokenizer
    description: str
    # data.mix: (corpus, its training tokens, weight) in `train`'s order; None for one corpus.
    mixture: list[tuple[str, int, float]] | None = None


def check_nonempty(corpus: Corpus) -> None:
    """Raise DataError if the corpus holds no text, or a token file no tokens (cheap)."""
    if corpus.kind == "bin":
        if read_sidecar(corpus)["n_tokens"] == 0:
            raise corpus.error("is empty")
        return
    if corpus.kind == "prepared":
        assert corpus.path is not None
        if read_manifest(corpus.path, corpus.field)["tokens"] == 0:
            raise corpus.error("is empty")
        return
    check_text_nonempty(corpus)


def corpus_specs(data_cfg: DataConfig) -> list[tuple[str, str, float]]:
    """(spec, the setting naming it, weight) of every corpus the run reads: data.mix's, or data.corpus."""
    if not data_cfg.mix:
        return [(data_cfg.corpus, "data.corpus", 1.0)]
    return [(spec, f"data.mix.{spec}", weight) for spec, weight in data_cfg.mix.items()]


def check_corpus(data_cfg: DataConfig) -> None:
    """Cheap pre-launch check: every corpus exists and holds something."""
    for spec, field, weight in corpus_specs(data_cfg):
        if not weight > 0:
            raise DataError(f"{field}={weight} must be > 0")
        check_nonempty(resolve_corpus(spec, field=field, encoding=data_cfg.encoding))


def check_vocab(tokenizer: str, vocab_size: int, field: str = "model.vocab_size") -> None:
    if tokenizer == "byte" and vocab_size < 256:
        raise DataError(f"{field}={vocab_size} is smaller than the byte tokenizer's 256 tokens")
    if tokenizer == "bpe" and vocab_size < 257:
        raise DataError(
            f"{field}={vocab_size} is too small for data.tokenizer=bpe, which needs at least 257 "
            "(the 256 byte tokens plus merges)"
        )
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"data.tokenizer={tokenizer!r} is not one of byte, bpe")


def cache_root(data_cfg: DataConfig) -> Path:
    return Path(data_cfg.cache_dir or os.environ.get("PLAIT_CACHE") or "~/.cache/plait").expanduser()


def private_dir(path: Path, parents: bool = False, own_links: bool = False) -> os.stat_result:
    """Create `path` owner-only (0700) if it is missing; refuse it if it is a symbolic link.

    Returns the folder's stat. An existing folder keeps its mode: a shared cache may be
    shared on purpose. Only the last component is checked; links above it are the user's.
    With `own_links`, a link this user made (the global cache pointed at a bigger disk) is
    followed; one anybody else made is still refused.
    """
    if own_links and path.is_symlink() and os.lstat(path).st_uid == os.getuid():
        path = path.resolve()
    try:
        path.mkdir(mode=0o700, parents=parents)
    except FileExistsError:
        pass
    try:
        # O_NOFOLLOW refuses a link in the same call that checks a folder is there.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        # Linux says ENOTDIR for a link under O_DIRECTORY, others ELOOP; lstat tells them apart.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise DataError(f"cache folder '{path}' is a symbolic link, which plait does not write through; "
                            "set data.cache_dir (or $PLAIT_CACHE) to a real folder") from None
        raise  # a file in the way: an OSError naming it, as for any other machine problem
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def corpus_cache_dir(corpus: Corpus, root: Path) -> Path:
    """The cache folder for `corpus`: `root` (data.cache_dir, $PLAIT_CACHE or ~/.cache/plait),
    whatever the corpus. Nothing is ever written beside an input."""
    private_dir(root, parents=True, own_links=True)  # the user's own choice of folder
    return root


# Tests stand in for a corpus that takes long to tokenise (on any machine) by pausing here.
TEST_PREPARE_PAUSE_ENV = "PLAIT_TEST_PREPARE_PAUSE_S"


def _pause_for_tests() -> None:
    seconds = os.environ.get(TEST_PREPARE_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


_WAIT_SAY_AFTER_S = 3.0
_WAIT_SAY_EVERY_S = 15.0


@contextmanager
def build_lock(cache: Path, corpus: Corpus) -> Iterator[None]:
    """Hold the cache's lock for `corpus`: the first process builds, the others wait here.

    A file lock, not a collective: however long tokenising takes, no parallel.timeout_s runs
    out. The holder's pid and host are written into the lock file so waiters can say whom they
    wait for; the kernel releases the lock if the holder dies."""
    key = hashlib.sha256(json.dumps([corpus.kind, str(corpus.path or corpus.spec)]).encode()).hexdigest()
    path = cache / f"{key[:24]}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for_lock(fd, corpus)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, corpus: Corpus) -> None:
    rank = os.environ.get("RANK")
    who = f"rank {rank}" if rank is not None else f"pid {os.getpid()}"
    start = time.monotonic()
    said = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.1)
        now = time.monotonic()
        # Silent for a moment: the lock is also held briefly to find a cache already built.
        if said is None and now - start >= _WAIT_SAY_AFTER_S:
            said = now
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace") or "another process"
            print(f"plait: {who} waits for {holder} to prepare '{corpus.spec}'", file=sys.stderr, flush=True)
        elif said is not None and now - said >= _WAIT_SAY_EVERY_S:
            said = now
            print(f"plait: {who} still waits for {holder} to prepare '{corpus.spec}' "
                  f"({now - start:.0f} s)", file=sys.stderr, flush=True)


def content_hash(corpus: Corpus, cache: Path) -> tuple[str, int, str | None]:
    """(sha256 of the UTF-8 text, its length in bytes, the text if it had to be read)."""
    if corpus.kind == "shakespeare":
        return SHAKESPEARE_SHA256, SHAKESPEARE_BYTES, None
    record = cache / f"text-{fingerprint(corpus)[:24]}.json"
    try:
        known = json.loads(record.read_text())
        return known["sha256"], int(known["bytes"]), None
    except (OSError, ValueError, KeyError):
        pass
    text = read_text(corpus)
    raw = text.encode("utf-8")
    sha = hashlib.sha256(raw).hexdigest()
    atomic_write_text(record, json.dumps({"sha256": sha, "bytes": len(raw), "corpus": corpus.spec}))
    return sha, len(raw), text


def cache_stem(corpus: Corpus, sha: str, tokenizer: str, vocab_size: int, val_fraction: float) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", corpus.path.name if corpus.path and corpus.kind != "python" else corpus.spec)
    tok = "byte" if tokenizer == "byte" else f"bpe{vocab_size}"
    return f"{name[:40]}-{sha[:16]}-{tok}-f{val_fraction!r}"


def token_file_stem(stem: str, tokenizer: str) -> str:
    # BPE token files since each piece is encoded as the whole text would be (tokenizer.safe_chunks):
    # the old caches, cut after newlines, differed at a few chunk boundaries.
    return stem if tokenizer == "byte" else f"{stem}-v2"


def get_tokenizer(name: str, vocab_size: int, text: str, val_fraction: float, path: Path) -> Tokenizer:
    """The byte tokenizer, or the BPE cached at `path` (trained on the training split if absent)."""
    if name == "byte":
        return ByteTokenizer()
    if path.is_file():
        try:
            return tokenizer_from_json(path.read_text())
        except DataError as exc:
            raise DataError(f"cache file '{path}': {exc}; delete it to train the tokenizer again") from None
    # Train on the text before the validation split so validation loss stays honest. The cut
    # is by characters; the token split is made later by count, so they differ by a few tokens.
    train_text = text[: len(text) - int(len(text) * val_fraction)]
    tokenizer = train_bpe(text_chunks(train_text), vocab_size)
    atomic_write_text(path, tokenizer.to_json())
    return tokenizer


def tokenize(tokenizer: Tokenizer, text: str, val_fraction: float) -> tuple[np.ndarray, int]:
    """(all token ids, index where the validation split begins: the last val_fraction of them)."""
    ids = encode_array(tokenizer, text, dtype_for_vocab(tokenizer.vocab_size))
    return ids, len(ids) - int(len(ids) * val_fraction)


def _prepare(data_cfg: DataConfig, vocab_size: int, field: str = "data.corpus") -> Corpus:
    """Build any missing cache; return the corpus to read: a `bin` or `prepared` Corpus."""
    corpus = resolve_corpus(data_cfg.corpus, field=field, encoding=data_cfg.encoding)
    check_nonempty(corpus)
    if corpus.kind in ("bin", "prepared"):
        return corpus
    check_vocab(data_cfg.tokenizer, vocab_size)
    cache = corpus_cache_dir(corpus, cache_root(data_cfg))
    with build_lock(cache, corpus):
        sha, n_bytes, text = content_hash(corpus, cache)
        stem = cache_stem(corpus, sha, data_cfg.tokenizer, vocab_size, data_cfg.val_fraction)
        out = cache / f"{token_file_stem(stem, data_cfg.tokenizer)}.bin"
        if not sidecar_path(out).is_file():  # the sidecar is written last: present means complete
            started = time.monotonic()
            if "WORLD_SIZE" in os.environ:  # under torchrun: the other ranks are told they wait for this
                print(f"plait: preparing '{corpus.spec}' into {cache}", file=sys.stderr, flush=True)
            text = read_text(corpus) if text is None else text
            tokenizer = get_tokenizer(data_cfg.tokenizer, vocab_size, text, data_cfg.val_fraction,
                                      cache / f"{stem}.tokenizer.json")
            ids, val_start = tokenize(tokenizer, text, data_cfg.val_fraction)
            _pause_for_tests()
            source = {"corpus": corpus.spec, "kind": corpus.kind, "sha256": sha, "bytes": n_bytes}
            write_token_file(out, ids, val_start, tokenizer, source)
            if "WORLD_SIZE" in os.environ:
                print(f"plait: prepared '{corpus.spec}': {len(ids):,} tokens in {time.monotonic() - started:.1f} s",
                      file=sys.stderr, flush=True)
    return Corpus(corpus.spec, "bin", out, corpus.field)


def ensure_prepared(data_cfg: DataConfig, vocab_size: int) -> None:
    """Build every cache for this run's corpora, tokenizer and vocab; a no-op when they exist."""
    for spec, field, _ in corpus_specs(data_cfg):
        _prepare(replace(data_cfg, corpus=spec), vocab_size, field)


def load_data(data_cfg: DataConfig, vocab_size: int, seq_len: int) -> PreparedData:
    """Memory-map the train and validation tokens, preparing them first if needed."""
    if data_cfg.mix:
        return _load_mixture(data_cfg, vocab_size, seq_len)
    corpus = _prepare(data_cfg, vocab_size)
    if corpus.kind == "prepared":
        return _load_prepared_folder(corpus, data_cfg.corpus, vocab_size, seq_len)
    token_file = corpus
    tokens, meta, tokenizer = read_token_file(token_file)
    spec = data_cfg.corpus
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the {tokenizer.name} tokenizer's "
            f"{tokenizer.vocab_size} tokens in '{spec}'"
        )
    is_bin = resolve_corpus(spec).kind == "bin"
    # An id past the embedding table would fail deep inside the model (or read garbage on a
    # GPU); one pass over the memory map finds it first. Caches hold only the ids of the
    # tokenizer checked above, so only a user's token file needs the pass.
    largest = int(tokens.max()) if is_bin and len(tokens) else -1
    if largest >= vocab_size:
        raise token_file.error(f"holds token id {largest:,}, but model.vocab_size={vocab_size} allows ids "
                               f"below {vocab_size:,}; raise model.vocab_size or re-run plait prepare")
    val_start = meta["val_start"]
    train, val = tokens[:val_start], tokens[val_start:]
    hints = {
        "training": "use a larger corpus or a smaller model.seq_len",
        "validation": "re-run plait prepare with a larger --val-fraction" if is_bin
        else "use a larger corpus, a larger data.val_fraction or a smaller model.seq_len",
    }
    for split, arr in (("training", train), ("validation", val)):
        if len(arr) < seq_len + 1:
            raise DataError(
                f"data.corpus: '{spec}' has {len(arr):,} {split} tokens, fewer than "
                f"model.seq_len + 1 = {seq_len + 1}; {hints[split]}"
            )
    tok_desc = "byte" if tokenizer.name == "byte" else f"{tokenizer.name}, vocab {tokenizer.vocab_size:,}"
    size = meta.get("source", {}).get("bytes")
    size_desc = f"{size:,} bytes" if isinstance(size, int) else f"{len(tokens):,} tokens"
    description = f"{spec}: {size_desc} -> {len(train):,} train / {len(val):,} val tokens ({tok_desc})"
    return PreparedData(train=train, val=val, tokenizer=tokenizer, description=description)


def _check_fits(tokenizer: Tokenizer, vocab_size: int, spec: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the {tokenizer.name} tokenizer's "
            f"{tokenizer.vocab_size} tokens in '{spec}'" + (f" (set model.vocab_size={tokenizer.vocab_size})"
                                                            if tokenizer.eos_id == 256 else "")
        )


def _check_split_sizes(spec: str, field: str, train_tokens: int, val_tokens: int, seq_len: int) -> None:
    for split, n in (("training", train_tokens), ("validation", val_tokens)):
        if n < seq_len + 1:
            raise DataError(f"{field}: '{spec}' has {n:,} {split} tokens, fewer than model.seq_len + 1 = "
                            f"{seq_len + 1}; use a larger corpus or a smaller model.seq_len")


def _tok_desc(tokenizer: Tokenizer) -> str:
    return "byte" if tokenizer.name == "byte" and tokenizer.eos_id is None else \
        f"{tokenizer.name}, vocab {tokenizer.vocab_size:,}"


def _load_prepared_folder(corpus: Corpus, spec: str, vocab_size: int, seq_len: int) -> PreparedData:
    assert corpus.path is not None
    train, val, meta, tokenizer = load_prepared(corpus.path, corpus.field)
    _check_fits(tokenizer, vocab_size, spec)
    n_train, n_val = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    _check_split_sizes(spec, corpus.field, n_train, n_val, seq_len)
    description = (f"{spec}: {meta['documents']:,} documents -> {n_train:,} train / {n_val:,} val tokens "
                   f"({_tok_desc(tokenizer)})")
    return PreparedData(train=tokens_of(train), val=tokens_of(val), tokenizer=tokenizer, description=description)


def _load_mixture(data_cfg: DataConfig, vocab_size: int, seq_len: int) -> PreparedData:
    """Every data.mix corpus, their training and validation tokens each read as one stream."""
    check_corpus(data_cfg)
    parts = [(spec, field, weight, load_data(replace(data_cfg, corpus=spec, mix={}), vocab_size, seq_len))
             for spec, field, weight in corpus_specs(data_cfg)]
    first_spec, _, _, first = parts[0]
    for spec, field, _, one in parts[1:]:
        if one.tokenizer.to_json() != first.tokenizer.to_json():
            raise DataError(f"{field}: '{spec}' has another tokenizer than '{first_spec}' ({_tok_desc(one.tokenizer)} "
                            f"vs {_tok_desc(first.tokenizer)}); prepare every corpus with the same one "
                            "(plait prepare --tokenizer FIRST_DIR/tokenizer.json)")
    total = sum(weight for _, _, weight, _ in parts)
    mixture = [(spec, len(one.train), weight / total) for spec, _, weight, one in parts]
    shares = ", ".join(f"{spec} {w:.0%}" for spec, _, w in mixture)
    description = f"mix of {len(parts)} corpora ({shares}): " + "; ".join(one.description for *_, one in parts)
    return PreparedData(
        train=TokenStream([p for *_, one in parts for p in _parts(one.train)]),
        val=TokenStream([p for *_, one in parts for p in _parts(one.val)]),
        tokenizer=first.tokenizer, description=description, mixture=mixture,
    )


def _parts(tokens: np.ndarray | TokenStream) -> list[np.ndarray]:
    return tokens.parts if isinstance(tokens, TokenStream) else [tokens]
