"""`plait prepare` throughput and memory against the tokenizers library's own batch encoder.

Builds two JSON Lines corpora in a temporary folder (default 10 MB and 200 MB) from the
built-in Shakespeare: its paragraphs shuffled into documents of about 2 KB. One byte-level
BPE (4,096 tokens with <|endoftext|>) is trained once and given to every run as a file, so
only tokenising is timed. For each corpus:

- plait: `plait prepare corpus.jsonl -o DIR --workers N --tokenizer tok.json` in a
  subprocess: wall time (interpreter start, hashing the input, reading, parsing, encoding,
  writing shards, index and manifest), the time of its tokenising pass alone (from its last
  line), and its peak RSS (VmHWM from /proc, read until it exits: wait4's ru_maxrss would count
  this parent's memory, copied at fork);
- reference: the same documents already in memory, encoded in one process by the
  library's `encode_batch_fast` (its fastest batch call, every core) in batches of 4,096.

Memory must stay flat: the 200 MB run's peak RSS within 1.2x of the 10 MB run's. Prints one
JSON object.

    python benchmarks/prepare.py [--sizes-mb 10 200] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait.data.corpus import read_text, resolve_corpus
from plait.data.tokenizer import END_OF_TEXT, text_chunks, train_bpe

VOCAB = 4096
DOC_CHARS = 2000
REFERENCE_BATCH = 4096


def make_corpus(path: Path, megabytes: float, seed: int) -> int:
    """Shakespeare's paragraphs, shuffled again for each pass, packed into ~2 KB documents."""
    paragraphs = [p for p in read_text(resolve_corpus("shakespeare")).split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(paragraphs)
            doc: list[str] = []
            size = 0
            for paragraph in paragraphs:
                doc.append(paragraph)
                size += len(paragraph) + 2
                if size >= DOC_CHARS:
                    line = json.dumps({"text": "\n\n".join(doc)}) + "\n"
                    f.write(line)
                    written += len(line.encode())
                    doc, size = [], 0
                    if written >= target:
                        break
    return written


def run_prepare(corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    args = [sys.executable, "-m", "plait", "prepare", str(corpus), "-o", str(out), "--workers", str(workers),
            "--tokenizer", str(tokenizer), "--force"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(args, stdout=stdout, stderr=stderr, text=True)
        peak_kb = 0
        while child.poll() is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        summary, errors = stdout.read().strip(), stderr.read()
    if child.returncode != 0:
        raise SystemExit(f"plait prepare failed:\n{errors}")
    manifest = json.loads((out / "manifest.json").read_text())
    encode_s = float(re.search(r" in ([0-9.]+) s", summary).group(1))  # type: ignore[union-attr]
    return {"seconds": seconds, "encode_seconds": encode_s, "tokens": manifest["tokens"],
            "documents": manifest["documents"], "peak_rss_mb": peak_kb / 1024, "summary": summary}


def run_reference(corpus: Path, tokenizer_file: Path) -> dict:
    from tokenizers import Tokenizer as HfTokenizer

    inner = HfTokenizer.from_str(json.dumps(json.loads(tokenizer_file.read_text())["tokenizers"]))
    docs = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(docs), REFERENCE_BATCH):
        for encoding in inner.encode_batch_fast(docs[i:i + REFERENCE_BATCH], add_special_tokens=False):
            tokens += len(encoding.ids) + 1  # + EOS, as plait writes
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 200])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", default=None, help="build the corpora here and keep them (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="plait-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        shakespeare = read_text(resolve_corpus("shakespeare"))
        tokenizer_file = root / "tokenizer.json"
        tokenizer_file.write_text(train_bpe(text_chunks(shakespeare[:2_000_000]), VOCAB,
                                            special_tokens=[END_OF_TEXT]).to_json())
        rows = {}
        for megabytes in args.sizes_mb:
            corpus = root / f"corpus-{megabytes:g}mb.jsonl"
            size = make_corpus(corpus, megabytes, seed=int(megabytes))
            ours = run_prepare(corpus, root / f"prepared-{megabytes:g}mb", tokenizer_file, args.workers)
            reference = run_reference(corpus, tokenizer_file)
            assert reference["tokens"] == ours["tokens"], (reference["tokens"], ours["tokens"])
            rows[f"{megabytes:g}MB"] = {
                "bytes": size, "documents": ours["documents"], "tokens": ours["tokens"],
                "plait_prepare_s": round(ours["seconds"], 2),
                "plait_prepare_mb_per_s": round(size / 1e6 / ours["seconds"], 2),
                "plait_prepare_tokens_per_s": round(ours["tokens"] / ours["seconds"]),
                "plait_tokenising_pass_s": round(ours["encode_seconds"], 2),
                "plait_tokenising_pass_mb_per_s": round(size / 1e6 / ours["encode_seconds"], 2),
                "reference_encode_s": round(reference["seconds"], 2),
                "reference_mb_per_s": round(size / 1e6 / reference["seconds"], 2),
                "reference_tokens_per_s": round(reference["tokens"] / reference["seconds"]),
                "plait_vs_reference_throughput": round(reference["seconds"] / ours["seconds"], 3),
                "plait_tokenising_pass_vs_reference": round(reference["seconds"] / ours["encode_seconds"], 3),
                "plait_peak_rss_mb": round(ours["peak_rss_mb"], 1),
            }
        peaks = [row["plait_peak_rss_mb"] for row in rows.values()]
        print(json.dumps({
            "benchmark": "prepare", "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
            "tokenizer": f"byte-level BPE, vocab {VOCAB}",
            "reference": "tokenizers encode_batch_fast, one process, every core, documents already in memory",
            "corpora": rows,
            "peak_rss_ratio_largest_vs_smallest": round(max(peaks) / min(peaks), 3),
            "memory_flat_within_1.2x": max(peaks) <= 1.2 * min(peaks),
        }, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
