"""`plait prepare INPUT... -o DIR`: formats, document framing, splits, reuse, bad input, torchrun.

The formats test trains 5 steps at dp 2 on what it prepared; the torchrun test prepares a
corpus that takes longer than parallel.timeout_s to tokenise under two torchrun ranks.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from plait.config import DataConfig
from plait.data import load_data, prepare
from plait.data.corpus import read_text, resolve_corpus
from plait.data.dataset import TEST_PREPARE_PAUSE_ENV
from plait.data.prepared import document_ends, load_prepared
from plait.data.sampler import get_batch
from plait.data.tokenizer import ByteTokenizer, dtype_for_vocab, encode_array, tokenizer_from_json, train_bpe
from plait.errors import DataError
from scenarios import read_jsonl, train_cli

SHORT_RUN = ["train.steps=5", "train.global_batch=4", "train.micro_batch=2", "train.eval_every=0",
             "train.eval_batches=1", "train.sample_tokens=0", "train.threads=1", "model.seq_len=64",
             "checkpoint.every=0", "log.tensorboard=false", "log.progress=none"]


def _documents(n: int, seed: int = 0) -> list[str]:
    """Varied documents with blank lines, runs of spaces and non-ASCII text (é, —, 日本)."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog; naïve café — 日本語 text\t tab".split(" ")
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(int(rng.integers(1, 6)))]
        docs.append(f"doc {i}\n" + "\n\n".join(lines) + ("\n" if i % 3 else "  "))
    return docs


def _write_jsonl_gz(path: Path, docs: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")


def _write_jsonl_zst(path: Path, docs: list[str]) -> None:
    import zstandard

    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as out:
        for doc in docs:
            out.write((json.dumps({"text": doc, "meta": {"lang": "en"}}) + "\n").encode())


def _write_parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=7)


def _write_datasets_folder(path: Path, docs: list[str]) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path), num_shards=2)


def _split_documents(folder: Path, tokenizer, split: str) -> list[str]:
    train, val, meta, _ = load_prepared(folder)
    tokens = np.concatenate(train if split == "train" else val)
    ends = document_ends(folder, split).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    docs = []
    for start, end in zip(starts, ends):
        ids = tokens[start:end].tolist()
        assert ids[-1] == meta["eos_id"], "every document ends with EOS"
        docs.append(tokenizer.decode(ids[:-1]))
    return docs


def _expected_split(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    i = np.arange(len(docs))
    held = np.floor((i + 1) * val_fraction + 0.5) > np.floor(i * val_fraction + 0.5)
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def test_four_formats_prepare_decode_and_train_at_dp2(tmp_path, capsys):
    docs = _documents(60)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_jsonl_gz(inputs / "a.jsonl.gz", docs[:15])
    _write_jsonl_zst(inputs / "b.jsonl.zst", docs[15:30])
    _write_parquet(inputs / "c.parquet", docs[30:45])
    _write_datasets_folder(inputs / "d_saved", docs[45:])
    assert len(json.loads((inputs / "d_saved" / "state.json").read_text())["_data_files"]) > 1  # several shards
    out = tmp_path / "corpus"
    # A file, a glob and a datasets folder, in that order.
    argv = [str(inputs / "a.jsonl.gz"), str(inputs / "[bc].*"), str(inputs / "d_saved"), "-o", str(out),
            "--val-fraction", "0.1", "--workers", "2", "--shard-tokens", "2000"]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"{out}: 4 sources, 60 documents -> ")
    assert "plait prepare: 60 documents" in printed.err and "tokens/s" in printed.err and "ETA" in printed.err

    meta = json.loads((out / "manifest.json").read_text())
    assert [(Path(s["path"]).name, s["kind"], s["compression"], s["documents"]) for s in meta["sources"]] == [
        ("a.jsonl.gz", "jsonl", "gzip", 15), ("b.jsonl.zst", "jsonl", "zstd", 15),
        ("c.parquet", "parquet", None, 15), ("d_saved", "datasets", None, 15)]
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    assert (meta["documents"], meta["splits"]["val"]["documents"], meta["dtype"]) == (60, 6, "uint16")
    assert meta["tokenizer"] == {"type": "byte", "eos": 256} and meta["eos_id"] == 256
    assert len(meta["splits"]["train"]["shards"]) > 1  # documents cross shard boundaries
    tokenizer = ByteTokenizer(eos=True)
    train_docs, val_docs = _expected_split(docs, 0.1)
    assert _split_documents(out, tokenizer, "train") == train_docs
    assert _split_documents(out, tokenizer, "val") == val_docs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # Windows read across shards equal the concatenated stream's.
    data = load_data(DataConfig(corpus=str(out)), vocab_size=257, seq_len=64)
    whole = np.concatenate(load_prepared(out)[0]).astype(np.int64)
    starts = np.array([0, 1990, 3000, len(whole) - 65])
    inputs_, targets = get_batch(data.train, starts, 64)
    assert inputs_.tolist() == [whole[s:s + 64].tolist() for s in starts]
    assert targets.tolist() == [whole[s + 1:s + 65].tolist() for s in starts]

    run = tmp_path / "run"
    done = train_cli(run, SHORT_RUN + [f"data.corpus={out}", "model.vocab_size=257"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [row["loss"] for row in read_jsonl(run / "metrics.jsonl")]
    assert len(losses) == 5 and all(np.isfinite(losses))


def test_text_json_array_and_bpe_encode_each_document_whole(tmp_path):
    docs = _documents(30, seed=1)
    (tmp_path / "t").mkdir()
    for i, doc in enumerate(docs[:5]):
        (tmp_path / "t" / f"{i}.txt").write_text(doc)
    (tmp_path / "t" / "notes.md").write_text(docs[5])
    (tmp_path / "t" / ".hidden.txt").write_text("never read")
    (tmp_path / "r.json").write_text(json.dumps([{"body": d} for d in docs[6:]]))
    out = tmp_path / "bpe"
    assert prepare.main([str(tmp_path / "t"), str(tmp_path / "r.json"), "-o", str(out), "--text-field", "body",
                         "--tokenizer", "bpe", "--vocab-size", "320", "--val-fraction", "0.2"]) == 0
    _, _, meta, tokenizer = load_prepared(out)
    assert tokenizer.eos_id is not None and tokenizer.vocab_size == 320
    ordered = docs[:5] + [docs[5]] + docs[6:]  # the folder's files sorted: 0-4.txt, notes.md
    train, val = _expected_split(ordered, 0.2)
    assert _split_documents(out, tokenizer, "train") == train and _split_documents(out, tokenizer, "val") == val
    # Each document's ids are exactly those of encoding it whole.
    tokens = np.concatenate(load_prepared(out)[0])
    ends = document_ends(out, "train").astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    for doc, start, end in zip(train, starts, ends):
        assert tokens[start:end].tolist() == tokenizer.encode(doc) + [tokenizer.eos_id]
    # The prepared folder's tokenizer.json prepares another corpus with the same ids (for data.mix).
    again = tmp_path / "again"
    assert prepare.main([str(tmp_path / "r.json"), "-o", str(again), "--text-field", "body",
                         "--tokenizer", str(out / "tokenizer.json"), "--val-fraction", "0.2"]) == 0
    assert load_prepared(again)[3].to_json() == tokenizer.to_json()


def test_single_token_file_encoding_has_no_chunk_boundary_differences():
    # The example: a CPython test file whose 16K-character chunks changed 7 ids.
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_shutil.py").read_text()
    shakespeare = read_text(resolve_corpus("shakespeare"))[:300_000]
    tokenizer = train_bpe([shakespeare, text[:50_000]], 600)
    assert encode_array(tokenizer, text, np.dtype(np.uint32)).tolist() == tokenizer.encode(text)


def test_rerun_reuses_and_replaces_only_with_force(tmp_path, capsys):
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(20)))
    out = tmp_path / "out"
    assert prepare.main([str(source), "-o", str(out)]) == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert prepare.main([str(source), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: up to date (1 sources unchanged)\n"
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(25)))
    with pytest.raises(DataError, match="prepared from other inputs or options; --force replaces it"):
        prepare.main([str(source), "-o", str(out)])
    assert prepare.main([str(source), "-o", str(out), "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["documents"] == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is a folder that is not a prepared corpus"):
        prepare.main([str(source), "-o", str(tmp_path / "mine"), "--force"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plait", "prepare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_bad_input_names_file_and_line_or_is_skipped(tmp_path, capsys):
    good = json.dumps({"text": "fine"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(f"{good}\n\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        prepare.main([str(bad), "-o", str(tmp_path / "out")])
    assert str(e.value).startswith(f"{bad}:3: not valid JSON")
    with pytest.raises(DataError) as e:
        prepare.main([str(missing), "-o", str(tmp_path / "out")])
    assert str(e.value).startswith(f"{missing}:3: no 'text' field (its fields: body")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "missing.jsonl"]  # nothing half-written

    assert prepare.main([str(bad), str(missing), "-o", str(tmp_path / "out"), "--skip-bad",
                         "--val-fraction", "0.4"]) == 0
    assert capsys.readouterr().out.endswith(", 2 bad records skipped\n")
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (meta["documents"], meta["skipped"]) == (4, 2)
    assert [s["skipped"] for s in meta["sources"]] == [1, 1]


def test_refusals_exit_2_with_one_line_and_leave_nothing(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    for args, message in [
        (["data.csv"], "INPUT: 'data.csv' has an extension plait prepare does not read"),
        (["empty.jsonl"], "INPUT: empty.jsonl holds no documents (1 sources, 1 empty, 0 bad records skipped)"),
        (["nothing-*.jsonl"], "INPUT: 'nothing-*.jsonl' matches no file"),
    ]:
        done = _cli(*args, "-o", "out", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[-1].startswith(f"plait: error: {message}")
        assert len([line for line in done.stderr.splitlines() if line.startswith("plait: error")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "empty.jsonl"]
    with pytest.raises(DataError, match="too large for token files"):
        dtype_for_vocab((1 << 32) + 1)


def test_too_large_vocabulary_leaves_nothing(tmp_path, monkeypatch):
    class Huge(ByteTokenizer):
        vocab_size = (1 << 32) + 1
        eos_id = 256

    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.setattr(prepare, "load_tokenizer_file", lambda path: Huge())
    with pytest.raises(DataError) as e:
        prepare.main([str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")])
    assert str(e.value) == "a vocabulary of 4,294,967,297 tokens is too large for token files (uint32 ids hold " \
                           "4,294,967,296)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "tok.json"]


def test_legacy_bin_form_is_unchanged(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("héllo world\n" * 100)
    out = tmp_path / "c.bin"
    assert prepare.main([str(corpus), "-o", str(out), "--val-fraction", "0.1"]) == 0
    assert capsys.readouterr().out == (
        f"{out}: {corpus} (1,300 bytes) -> 1,170 train / 130 val uint16 tokens (byte, vocab 256)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.json", "c.txt"]  # no cache beside
    assert tokenizer_from_json(json.dumps(json.loads((tmp_path / "c.bin.json").read_text())["tokenizer"])).eos_id is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_wait_for_a_slow_preparation_without_timing_out(tmp_path):
    # A corpus whose preparation takes longer than parallel.timeout_s = 10 on any machine: a
    # 2,048-token BPE trained on Shakespeare, plus a pause the preparation takes for tests.
    # Rank 0 prepares; rank 1 waits on the cache's file lock.
    corpus = tmp_path / "big.txt"
    corpus.write_text(read_text(resolve_corpus("shakespeare")))
    cache = tmp_path / "fresh-cache"
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "plait", "train",
            "--run-dir", str(tmp_path / "run")]
    overrides = SHORT_RUN + ["train.steps=2", f"data.corpus={corpus}", "data.tokenizer=bpe",
                             "model.vocab_size=2048", "parallel.timeout_s=10", f"data.cache_dir={cache}"]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", TEST_PREPARE_PAUSE_ENV: "11"}
    start = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-4000:]
    assert "waits for pid" in done.stderr, done.stderr[-4000:]
    prepared = [line for line in done.stderr.splitlines() if line.startswith("plait: prepared ")]
    assert len(prepared) == 1, done.stderr[-4000:]  # one process prepared; the other only waited
    seconds = float(prepared[0].rsplit(" in ", 1)[1].split(" s")[0])
    assert seconds > 10, f"preparation took {seconds:.1f} s, not longer than parallel.timeout_s ({took:.0f} s in all)"
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
