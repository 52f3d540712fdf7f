"""`plait prepare`: tokenise a corpus once, for training.

Two forms:

- `plait prepare INPUT... -o DIR`: text, JSON Lines, JSON, Parquet, Arrow and `datasets`
  folders (plait/data/sources.py), compressed or not, streamed and tokenised in parallel into
  a prepared folder (plait/data/prepared.py, docs/data.md): documents split into train and
  validation, each ending with the tokenizer's EOS. `data.corpus=DIR` trains on it.
- `plait prepare INPUT -o OUT.bin` (the first form plait had, kept as it was): one corpus as
  `data.corpus` names it, one flat token file with a JSON sidecar carrying the tokenizer and
  the validation split (the last --val-fraction of the tokens).

Either way the output is written under a temporary name and renamed into place when complete,
so a failure (bad input: exit status 2) leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from plait.config import DataConfig
from plait.data.corpus import read_text, resolve_corpus
from plait.data.dataset import (
    cache_root,
    cache_stem,
    check_nonempty,
    check_vocab,
    content_hash,
    corpus_cache_dir,
    get_tokenizer,
    private_dir,
    tokenize,
)
from plait.data.pipeline import Progress, encode_into, is_validation, iter_documents
from plait.data.prepared import FORMAT, MANIFEST, SPLITS, VERSION, SplitWriter, is_prepared
from plait.data.sources import Source, expand_inputs, sha256_of
from plait.data.tokenfile import atomic_write_text, sidecar_path, write_token_file
from plait.data.tokenizer import END_OF_TEXT, ByteTokenizer, Tokenizer, dtype_for_vocab, tokenizer_from_json, train_bpe
from plait.errors import DataError
from plait.outputs import check_output_file

DEFAULT_BPE_VOCAB = 4096
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plait prepare",
        description="Tokenise files, folders and globs into a prepared folder DIR (or one corpus into OUT.bin).")
    p.add_argument("input", metavar="INPUT", nargs="+",
                   help="files, folders or globs of .txt/.md, .jsonl/.json (.gz, .zst), .parquet, .arrow and "
                        "datasets folders; with -o OUT.bin: one corpus (shakespeare, python, a text file or folder)")
    p.add_argument("-o", "--output", required=True, metavar="DIR|OUT.bin",
                   help="prepared folder to write (OUT.bin: a single token file)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE.json",
                   help="byte (default), bpe (trained here), or a tokenizer file: a prepared folder's "
                        "tokenizer.json, or a tokenizers-library JSON such as a Hugging Face tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE vocabulary size (default {DEFAULT_BPE_VOCAB}; byte is always 256)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share held out for validation: of the documents (DIR), of the tokens (OUT.bin)")
    p.add_argument("--encoding", default="utf-8",
                   help="the encoding of text files, as data.encoding (default utf-8; JSON is always UTF-8)")
    p.add_argument("--cache-dir", default="",
                   help="where trained tokenizers and corpus caches go (default $PLAIT_CACHE or ~/.cache/plait)")
    p.add_argument("--text-field", default="text", help="the field (JSON) or column (Parquet, Arrow) holding the text")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer threads (default: every core this process may use)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records and records without the text field (counted and reported)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    return p


def main(argv: list[str]) -> int:
    """Run `plait prepare`; raises DataError (exit status 2 in the CLI) for bad input."""
    args = _parser().parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction={args.val_fraction} must lie strictly between 0 and 1")
    if Path(args.output).suffix == ".bin":
        return _prepare_token_file(args)
    return _prepare_folder(args)


# ---- OUT.bin: one corpus, one token file --------------------------------------------------


def _prepare_token_file(args: argparse.Namespace) -> int:
    if len(args.input) != 1:
        raise DataError(f"-o {args.output}: a .bin token file takes one INPUT, got {len(args.input)}; "
                        "write a prepared folder (-o DIR) to combine several")
    if args.tokenizer not in ("byte", "bpe"):
        raise DataError(f"--tokenizer={args.tokenizer!r}: a .bin token file takes byte or bpe")
    vocab_size = args.vocab_size or (256 if args.tokenizer == "byte" else DEFAULT_BPE_VOCAB)
    out = Path(args.output)
    # Checked before the corpus is read: tokenising can take long, and a typo must not replace
    # a token file that a run is reading.
    check_output_file(out, "-o", args.force)
    check_output_file(sidecar_path(out), "-o", args.force)
    corpus = resolve_corpus(args.input[0], field="INPUT", encoding=args.encoding)
    if corpus.kind in ("bin", "prepared"):
        raise DataError(f"INPUT: '{args.input[0]}' is already tokenised")
    check_nonempty(corpus)
    check_vocab(args.tokenizer, vocab_size, field="--vocab-size")

    # The BPE is cached in the cache folder, exactly as for training, so both reuse one training run.
    cache = corpus_cache_dir(corpus, cache_root(DataConfig(cache_dir=args.cache_dir)))
    sha, n_bytes, text = content_hash(corpus, cache)
    text = read_text(corpus) if text is None else text
    stem = cache_stem(corpus, sha, args.tokenizer, vocab_size, args.val_fraction)
    tokenizer = get_tokenizer(args.tokenizer, vocab_size, text, args.val_fraction, cache / f"{stem}.tokenizer.json")
    ids, val_start = tokenize(tokenizer, text, args.val_fraction)
    source = {"corpus": args.input[0], "kind": corpus.kind, "sha256": sha, "bytes": n_bytes}
    write_token_file(out, ids, val_start, tokenizer, source)
    print(
        f"{out}: {args.input[0]} ({n_bytes:,} bytes) -> {val_start:,} train / {len(ids) - val_start:,} val "
        f"{ids.dtype.name} tokens ({tokenizer.name}, vocab {tokenizer.vocab_size:,})"
    )
    return 0


# ---- DIR: many sources, a prepared folder ---------------------------------------------------


def _prepare_folder(args: argparse.Namespace) -> int:
    out = Path(args.output)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    if workers < 1:
        raise DataError(f"--workers={workers} must be at least 1")
    if args.shard_tokens < 1:
        raise DataError(f"--shard-tokens={args.shard_tokens} must be at least 1")
    _check_output_folder(out)
    _set_threads(workers)
    sources = expand_inputs(args.input)
    if not sources:
        raise DataError(f"INPUT: {' '.join(args.input)} holds no files")
    digests = [sha256_of(s) for s in sources]
    inputs = {
        "sources": [{**s.describe(), "sha256": d} for s, d in zip(sources, digests)],
        "tokenizer": _tokenizer_key(args), "text_field": args.text_field, "encoding": args.encoding,
        "val_fraction": args.val_fraction, "skip_bad": args.skip_bad, "shard_tokens": args.shard_tokens,
    }
    if is_prepared(out):
        if _manifest_inputs(out) == inputs:
            print(f"{out}: up to date ({len(sources)} sources unchanged)")
            return 0
        if not args.force:
            raise DataError(f"-o: '{out}' holds a corpus prepared from other inputs or options; --force replaces it")

    tokenizer = _folder_tokenizer(args, sources, digests)
    if tokenizer.eos_id is None:
        raise DataError(f"--tokenizer={args.tokenizer}: the tokenizer has no end-of-document token "
                        "(such as <|endoftext|> or </s>), which every prepared document ends with")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        writers = {split: SplitWriter(tmp, split, dtype, args.shard_tokens) for split in SPLITS}
        total_bytes = sum(s.size for s in sources)
        progress = Progress(total_bytes, lambda: sum(s.done_bytes for s in sources))
        try:
            encode_into(sources, tokenizer, writers, text_field=args.text_field, encoding=args.encoding,
                        skip_bad=args.skip_bad, val_fraction=args.val_fraction, progress=progress)
        finally:
            splits = {split: writer.close() for split, writer in writers.items()}
        seconds = progress.finish()
        _check_splits(splits, sources, args)
        atomic_write_text(tmp / "tokenizer.json", tokenizer.to_json() + "\n")
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name,
            "tokenizer": json.loads(tokenizer.to_json()), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "documents": sum(s["documents"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "skipped": sum(s.skipped for s in sources), "empty": sum(s.empty for s in sources),
            "splits": splits,
            "sources": [{**entry, "bytes": s.size, "documents": s.documents, "skipped": s.skipped, "empty": s.empty}
                        for entry, s in zip(inputs["sources"], sources)],
            "inputs": inputs,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: present means complete
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    skipped = f", {manifest['skipped']:,} bad records skipped" if manifest["skipped"] else ""
    print(f"{out}: {len(sources)} sources, {manifest['documents']:,} documents -> "
          f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val {dtype.name} tokens "
          f"({tokenizer.name}, vocab {tokenizer.vocab_size:,}) in {seconds:.1f} s{skipped}")
    return 0


def _check_output_folder(out: Path) -> None:
    """Only a prepared folder (or an empty one) is ever replaced: --force never deletes a folder
    of someone's files."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise DataError(f"-o: '{out}' is a file; name a folder (or end it in .bin for a single token file)")
    if not is_prepared(out) and any(out.iterdir()):
        raise DataError(f"-o: '{out}' is a folder that is not a prepared corpus; choose a new folder")


def _manifest_inputs(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`, replacing what is there (a prepared or empty folder)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _set_threads(workers: int) -> None:
    """The tokenizers library's thread pool size: read from the environment when first used."""
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"


def _tokenizer_key(args: argparse.Namespace) -> dict:
    if args.tokenizer == "byte":
        return {"type": "byte"}
    if args.tokenizer == "bpe":
        return {"type": "bpe", "vocab_size": args.vocab_size or DEFAULT_BPE_VOCAB}
    path = Path(args.tokenizer)
    if not path.is_file():
        raise DataError(f"--tokenizer={args.tokenizer!r} is not byte, bpe or a tokenizer file")
    return {"type": "file", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _folder_tokenizer(args: argparse.Namespace, sources: list[Source], digests: list[str]) -> Tokenizer:
    """The tokenizer for a prepared folder; a BPE is trained on the training documents and cached."""
    if args.tokenizer == "byte":
        return ByteTokenizer(eos=True)
    if args.tokenizer != "bpe":
        return load_tokenizer_file(Path(args.tokenizer))
    vocab_size = args.vocab_size or DEFAULT_BPE_VOCAB
    check_vocab("bpe", vocab_size - 1, field="--vocab-size")  # one id goes to <|endoftext|>
    key = hashlib.sha256(json.dumps([digests, vocab_size, args.val_fraction, args.text_field,
                                     args.encoding, args.skip_bad]).encode()).hexdigest()
    root = cache_root(DataConfig(cache_dir=args.cache_dir))
    private_dir(root, parents=True, own_links=True)
    cached = root / f"prepare-bpe{vocab_size}-{key[:24]}.tokenizer.json"
    if cached.is_file():
        return load_tokenizer_file(cached)
    fresh = [dataclasses.replace(s) for s in sources]  # counters of this pass stay out of the manifest
    train_docs = (text for i, text in enumerate(iter_documents(fresh, args.text_field, args.encoding, args.skip_bad))
                  if not is_validation(i, args.val_fraction))
    tokenizer = train_bpe(train_docs, vocab_size, special_tokens=[END_OF_TEXT])
    atomic_write_text(cached, tokenizer.to_json())
    return tokenizer


def load_tokenizer_file(path: Path) -> Tokenizer:
    """A plait tokenizer JSON (a prepared folder's tokenizer.json) or a tokenizers-library file."""
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"--tokenizer: '{path}' is not a tokenizer JSON file ({exc})") from None
    if isinstance(obj, dict) and obj.get("type") == "byte":
        return ByteTokenizer(eos=True)  # prepared documents always end with EOS
    try:
        if isinstance(obj, dict) and obj.get("type") == "bpe":
            return tokenizer_from_json(text)
        return tokenizer_from_json(json.dumps({"type": "bpe", "tokenizers": obj}))
    except DataError as exc:
        raise DataError(f"--tokenizer: '{path}': {exc}") from None


def _check_splits(splits: dict, sources: list[Source], args: argparse.Namespace) -> None:
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    if documents == 0:
        skipped, empty = sum(s.skipped for s in sources), sum(s.empty for s in sources)
        raise DataError(f"INPUT: {' '.join(args.input)} holds no documents "
                        f"({len(sources)} sources, {empty:,} empty, {skipped:,} bad records skipped)")
    if splits["val"]["documents"] == 0:
        raise DataError(f"--val-fraction={args.val_fraction}: {documents:,} documents leave none for validation "
                        f"(one in every {1 / args.val_fraction:.0f} is held out); raise --val-fraction")
    if splits["train"]["documents"] == 0:
        raise DataError(f"--val-fraction={args.val_fraction}: {documents:,} documents leave none for training")
