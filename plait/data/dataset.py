"""From a `data.corpus` spec to memory-mapped train/validation token arrays.

Caches, all keyed by the corpus's content hash and written atomically:
  text-<fingerprint>.json                      content hash of the decoded text, so a warm
                                               start needs only a stat of each source file
  <name>-<hash>-bpe<V>-f<F>.tokenizer.json     the trained BPE (byte needs none)
  <name>-<hash>-<byte|bpeV>-f<F>.bin(.json)    the token file, same format as `plait prepare`
They live in `<path>.plait-cache/` beside a user's file or folder when that is writable,
otherwise (and for the built-in corpora) in data.cache_dir, $PLAIT_CACHE or ~/.cache/plait.
Cache folders are created owner-only (0700), and one that is a symbolic link is refused
rather than written through (someone else could have planted it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
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
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    description: str


def check_nonempty(corpus: Corpus) -> None:
    """Raise DataError if the corpus holds no text, or a token file no tokens (cheap)."""
    if corpus.kind == "bin":
        if read_sidecar(corpus)["n_tokens"] == 0:
            raise corpus.error("is empty")
        return
    check_text_nonempty(corpus)


def check_corpus(data_cfg: DataConfig) -> None:
    """Cheap pre-launch check: the corpus exists and holds something."""
    check_nonempty(resolve_corpus(data_cfg.corpus, encoding=data_cfg.encoding))


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
    """`<path>.plait-cache/` beside a user's corpus when it is ours and writable, else `root`."""
    if corpus.kind in ("file", "folder") and corpus.path is not None:
        beside = corpus.path.with_name(corpus.path.name + ".plait-cache")
        try:
            owner = private_dir(beside).st_uid
        except OSError:
            owner = None  # e.g. a read-only folder: the global cache instead
        # Another user's folder there (made before ours) could have its files swapped under us.
        if owner == os.getuid() and os.access(beside, os.W_OK):
            return beside
    private_dir(root, parents=True, own_links=True)  # the user's own choice of folder
    return root


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


def _prepare(data_cfg: DataConfig, vocab_size: int) -> Corpus:
    """Build any missing cache; return the token file to read as a `bin` Corpus."""
    corpus = resolve_corpus(data_cfg.corpus, encoding=data_cfg.encoding)
    check_nonempty(corpus)
    if corpus.kind == "bin":
        return corpus
    check_vocab(data_cfg.tokenizer, vocab_size)
    cache = corpus_cache_dir(corpus, cache_root(data_cfg))
    sha, n_bytes, text = content_hash(corpus, cache)
    stem = cache_stem(corpus, sha, data_cfg.tokenizer, vocab_size, data_cfg.val_fraction)
    out = cache / f"{stem}.bin"
    if not sidecar_path(out).is_file():  # the sidecar is written last: present means complete
        text = read_text(corpus) if text is None else text
        tokenizer = get_tokenizer(data_cfg.tokenizer, vocab_size, text, data_cfg.val_fraction,
                                  cache / f"{stem}.tokenizer.json")
        ids, val_start = tokenize(tokenizer, text, data_cfg.val_fraction)
        source = {"corpus": corpus.spec, "kind": corpus.kind, "sha256": sha, "bytes": n_bytes}
        write_token_file(out, ids, val_start, tokenizer, source)
    return Corpus(corpus.spec, "bin", out, corpus.field)


def ensure_prepared(data_cfg: DataConfig, vocab_size: int) -> None:
    """Build every cache for this corpus, tokenizer and vocab; a no-op when they exist."""
    _prepare(data_cfg, vocab_size)


def load_data(data_cfg: DataConfig, vocab_size: int, seq_len: int) -> PreparedData:
    """Memory-map the train and validation tokens, preparing them first if needed."""
    token_file = _prepare(data_cfg, vocab_size)
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
