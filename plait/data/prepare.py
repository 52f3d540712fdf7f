"""`plait prepare INPUT -o OUT.bin`: tokenise a corpus once into a token file for training.

Training then reads OUT.bin with `data.corpus=OUT.bin`; its tokenizer and validation split
travel in OUT.bin.json, so data.tokenizer and data.val_fraction are not consulted for it.
"""

from __future__ import annotations

import argparse
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
    tokenize,
)
from plait.data.tokenfile import sidecar_path, write_token_file
from plait.errors import DataError
from plait.outputs import check_output_file

DEFAULT_BPE_VOCAB = 4096


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plait prepare", description="Tokenise a corpus into OUT.bin + OUT.bin.json.")
    p.add_argument("input", metavar="INPUT", help="shakespeare, python, a text file or a folder of text files")
    p.add_argument("-o", "--output", required=True, metavar="OUT.bin", help="token file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT.bin and OUT.bin.json if they exist")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE vocabulary size (default {DEFAULT_BPE_VOCAB}; byte is always 256)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out for validation")
    p.add_argument("--encoding", default="utf-8",
                   help="the text's encoding, as data.encoding (default utf-8; e.g. latin-1)")
    p.add_argument("--cache-dir", default="", help="where built-in corpora cache their BPE (default $PLAIT_CACHE)")
    return p


def main(argv: list[str]) -> int:
    """Run `plait prepare`; raises DataError (exit status 2 in the CLI) for bad input."""
    args = _parser().parse_args(argv)
    vocab_size = args.vocab_size or (256 if args.tokenizer == "byte" else DEFAULT_BPE_VOCAB)
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction={args.val_fraction} must lie strictly between 0 and 1")
    out = Path(args.output)
    if out.suffix != ".bin":
        raise DataError(f"-o: '{args.output}' must end in .bin (that is how data.corpus recognises token files)")
    # Checked before the corpus is read: tokenising can take long, and a typo must not replace
    # a token file that a run is reading.
    check_output_file(out, "-o", args.force)
    check_output_file(sidecar_path(out), "-o", args.force)
    corpus = resolve_corpus(args.input, field="INPUT", encoding=args.encoding)
    if corpus.kind == "bin":
        raise DataError(f"INPUT: '{args.input}' is already a token file")
    check_nonempty(corpus)
    check_vocab(args.tokenizer, vocab_size, field="--vocab-size")

    # The BPE is cached beside the data, exactly as for training, so both reuse one training run.
    cache = corpus_cache_dir(corpus, cache_root(DataConfig(cache_dir=args.cache_dir)))
    sha, n_bytes, text = content_hash(corpus, cache)
    text = read_text(corpus) if text is None else text
    stem = cache_stem(corpus, sha, args.tokenizer, vocab_size, args.val_fraction)
    tokenizer = get_tokenizer(args.tokenizer, vocab_size, text, args.val_fraction, cache / f"{stem}.tokenizer.json")
    ids, val_start = tokenize(tokenizer, text, args.val_fraction)
    source = {"corpus": args.input, "kind": corpus.kind, "sha256": sha, "bytes": n_bytes}
    write_token_file(out, ids, val_start, tokenizer, source)
    print(
        f"{out}: {args.input} ({n_bytes:,} bytes) -> {val_start:,} train / {len(ids) - val_start:,} val "
        f"{ids.dtype.name} tokens ({tokenizer.name}, vocab {tokenizer.vocab_size:,})"
    )
    return 0
