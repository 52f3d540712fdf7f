"""Data package: sampler arithmetic, tokenizers, caches, token files and corpus errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.config import DataConfig
from plait.data import (
    GlobalSampler,
    check_corpus,
    ensure_prepared,
    eval_starts,
    get_batch,
    load_data,
    tokenizer_from_json,
)
from plait.data import dataset, prepare
from plait.data.corpus import read_text, resolve_corpus, source_files
from plait.data.tokenfile import read_token_file, write_token_file
from plait.data.tokenizer import ByteTokenizer, train_bpe
from plait.errors import DataError

MISSING_HINT = "expected shakespeare, python, a text file, a folder of text files or a .bin from plait prepare"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("PLAIT_CACHE", str(path))
    return path


def _text(n_lines: int = 400) -> str:
    # Varied but deterministic English-like text, enough for a few hundred BPE merges.
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings".split()
    return "".join(
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 7)) + ".\n" for i in range(n_lines)
    )


def _error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- sampler ---------------------------------------------------------------------------


def test_sampler_matches_definition_and_is_pure():
    # 41 tokens, seq_len 4 -> 10 windows; step 1 reads samples 0..3 of epoch 0.
    sampler = GlobalSampler(n_tokens=41, seq_len=4, global_batch=4, seed=7)
    perm0 = np.random.Generator(np.random.PCG64([7, 0])).permutation(10)
    assert sampler.global_batch_starts(1).tolist() == (perm0[:4] * 4).tolist()
    assert sampler.global_batch_starts(1).dtype == np.int64
    # Asking out of order, or from a fresh object (a resumed run), gives the same batches.
    later = [sampler.global_batch_starts(s).tolist() for s in (9, 2, 1)]
    fresh = GlobalSampler(41, 4, 4, 7)
    assert later == [fresh.global_batch_starts(s).tolist() for s in (9, 2, 1)]
    assert GlobalSampler(41, 4, 4, 8).global_batch_starts(1).tolist() != later[2]


def test_rank_slices_reassemble_the_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = GlobalSampler(len(tokens), seq_len=8, global_batch=12, seed=1)
    starts = sampler.global_batch_starts(3)
    full_x, full_y = get_batch(tokens, starts, 8)
    for dp in (1, 2, 3, 4, 6):
        rows = 12 // dp
        parts = [get_batch(tokens, starts[r * rows:(r + 1) * rows], 8) for r in range(dp)]
        assert torch.equal(torch.cat([x for x, _ in parts]), full_x)
        assert torch.equal(torch.cat([y for _, y in parts]), full_y)


def test_every_window_once_per_epoch_and_epoch_wrap():
    sampler = GlobalSampler(n_tokens=41, seq_len=4, global_batch=4, seed=3)
    seen = np.concatenate([sampler.global_batch_starts(s) for s in range(1, 6)])  # 20 samples
    assert sorted(seen[:10].tolist()) == list(range(0, 40, 4))
    assert sorted(seen[10:].tolist()) == list(range(0, 40, 4))
    assert seen[:10].tolist() != seen[10:].tolist()  # a new order each epoch
    # Step 3 straddles epochs 0 and 1: samples 8, 9 of epoch 0 then 0, 1 of epoch 1.
    perm1 = np.random.Generator(np.random.PCG64([3, 1])).permutation(10)
    assert sampler.global_batch_starts(3)[2:].tolist() == (perm1[:2] * 4).tolist()
    # A batch larger than the split spans three epochs.
    big = GlobalSampler(41, 4, 25, 3).global_batch_starts(1)
    assert big[:20].tolist() == seen.tolist()


def test_get_batch_shifts_targets_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 10]), 4)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert y.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]


def test_eval_starts():
    assert eval_starts(41, 4, 3).tolist() == [0, 12, 24]
    assert eval_starts(41, 4, 100).tolist() == list(range(0, 40, 4))
    assert eval_starts(5, 4, 8).tolist() == [0]
    with pytest.raises(ValueError):
        eval_starts(4, 4, 1)


# ---- tokenizers ------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.encode("hé\n") == [104, 195, 169, 10]
    assert tok.decode([104, 195, 169, 300, 10]) == "hé\n"  # ids >= 256 are skipped
    assert tok.decode([255]) == "\ufffd"
    again = tokenizer_from_json(tok.to_json())
    assert (again.name, again.vocab_size) == ("byte", 256)


def test_bpe_trains_deterministically_and_round_trips():
    text = _text()
    a, b = train_bpe([text], 300), train_bpe([text], 300)
    assert a.to_json() == b.to_json()
    assert (a.name, a.vocab_size) == ("bpe", 300)
    sample = "the lazy wizards — jolly kings! 🦊\n\tüber"
    assert a.decode(a.encode(sample)) == sample
    rebuilt = tokenizer_from_json(a.to_json())
    assert rebuilt.encode(sample) == a.encode(sample)
    assert len(a.encode("the quick brown fox")) < len("the quick brown fox")


def test_bpe_cache_is_reused_and_never_beside_the_data(tmp_path, monkeypatch, cache):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text())
    cfg = DataConfig(corpus=str(corpus), tokenizer="bpe")
    data = load_data(cfg, vocab_size=300, seq_len=16)
    assert (data.tokenizer.name, data.tokenizer.vocab_size) == ("bpe", 300)
    assert data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist()) == corpus.read_text()
    # Caches go to the cache folder only: nothing is written beside a user's file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "cache"]
    [tok_file] = cache.glob("*.tokenizer.json")
    mtime = tok_file.stat().st_mtime_ns
    # Force re-tokenising: the tokenizer must come from the cache, not a second training run.
    for path in cache.glob("*.bin*"):
        path.unlink()
    monkeypatch.setattr(dataset, "train_bpe", lambda *a: pytest.fail("BPE retrained"))
    again = load_data(cfg, vocab_size=300, seq_len=16)
    assert again.train.tolist() == data.train.tolist()
    assert tok_file.stat().st_mtime_ns == mtime
    assert not list(cache.glob(".*.tmp"))


def test_vocab_limits(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataConfig(), vocab_size=200, seq_len=16)
    assert _error(e) == "model.vocab_size=200 is smaller than the byte tokenizer's 256 tokens"
    with pytest.raises(DataError) as e:
        ensure_prepared(DataConfig(tokenizer="bpe"), vocab_size=256)
    assert _error(e) == (
        "model.vocab_size=256 is too small for data.tokenizer=bpe, which needs at least 257 "
        "(the 256 byte tokens plus merges)"
    )
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text())
    out = tmp_path / "c.bin"
    assert prepare.main([str(corpus), "-o", str(out), "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    with pytest.raises(DataError) as e:
        load_data(DataConfig(corpus=str(out)), vocab_size=280, seq_len=16)
    assert _error(e) == f"model.vocab_size=280 is smaller than the bpe tokenizer's 300 tokens in '{out}'"


# ---- token files -----------------------------------------------------------------------


def test_prepare_then_load_byte(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    text = "héllo world\n" * 100  # 1,300 bytes
    corpus.write_text(text)
    out = tmp_path / "c.bin"
    assert prepare.main([str(corpus), "-o", str(out), "--val-fraction", "0.1"]) == 0
    assert capsys.readouterr().out == (
        f"{out}: {corpus} (1,300 bytes) -> 1,170 train / 130 val uint16 tokens (byte, vocab 256)\n"
    )
    meta = json.loads((tmp_path / "c.bin.json").read_text())
    assert (meta["version"], meta["dtype"], meta["n_tokens"], meta["val_start"]) == (1, "uint16", 1300, 1170)
    assert meta["tokenizer"] == {"type": "byte"}
    assert out.stat().st_size == 2600
    data = load_data(DataConfig(corpus=str(out), val_fraction=0.5), vocab_size=256, seq_len=32)
    assert data.train.dtype == np.uint16
    assert bytes(np.concatenate([data.train, data.val]).tolist()) == text.encode()
    assert (len(data.train), len(data.val)) == (1170, 130)  # the split is the file's, not data.val_fraction's
    assert data.description == f"{out}: 1,300 bytes -> 1,170 train / 130 val tokens (byte)"


def test_prepare_bpe_round_trip(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_text())
    out = tmp_path / "c.bin"
    assert prepare.main([str(corpus), "-o", str(out), "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    data = load_data(DataConfig(corpus=str(out)), vocab_size=300, seq_len=16)
    assert data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist()) == corpus.read_text()
    n = len(data.train) + len(data.val)
    assert len(data.val) == int(n * 0.05)


def test_uint32_token_file(tmp_path):
    class WideTokenizer(ByteTokenizer):
        vocab_size = 70_000  # past uint16; stored tokenizer reads back as byte, enough here

    ids = np.array([0, 65_535, 65_536, 69_999] * 10, dtype=np.int64)
    out = tmp_path / "wide.bin"
    write_token_file(out, ids, val_start=30, tokenizer=WideTokenizer(), source={"corpus": "test"})
    assert out.stat().st_size == 160
    tokens, meta, _ = read_token_file(resolve_corpus(str(out)))
    assert (meta["dtype"], tokens.dtype) == ("uint32", np.uint32)
    assert tokens.tolist() == ids.tolist()
    data = load_data(DataConfig(corpus=str(out)), vocab_size=70_000, seq_len=4)  # every id must fit the model
    assert data.val.tolist() == [65_536, 69_999, 0, 65_535] * 2 + [65_536, 69_999]
    assert data.description == f"{out}: 40 tokens -> 30 train / 10 val tokens (byte)"


def test_changed_file_is_retokenised(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a" * 200)
    cfg = DataConfig(corpus=str(corpus))
    assert set(load_data(cfg, 256, 8).train.tolist()) == {97}
    corpus.write_text("b" * 300)
    data = load_data(cfg, 256, 8)
    assert set(data.train.tolist()) == {98} and len(data.train) + len(data.val) == 300


# ---- corpora and their errors ----------------------------------------------------------


def test_missing_and_empty_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bindir").mkdir()
    (tmp_path / "bindir" / "blob.dat").write_bytes(b"\x89PNG\0\0")
    (tmp_path / "orphan.bin").write_bytes(b"\0\0")
    cases = {
        "nope.txt": f"data.corpus: 'nope.txt' does not exist ({MISSING_HINT})",
        "empty.txt": "data.corpus: 'empty.txt' is empty",
        "emptydir": "data.corpus: 'emptydir' is empty (no non-empty text files in it)",
        "bindir": "data.corpus: 'bindir' is empty (no non-empty text files in it)",
        "orphan.bin": "data.corpus: 'orphan.bin' has no sidecar 'orphan.bin.json'; "
        "make token files with plait prepare INPUT -o OUT.bin",
    }
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for spec, message in cases.items():
            for call in (lambda: check_corpus(DataConfig(corpus=spec)),
                         lambda: load_data(DataConfig(corpus=spec), 256, 8)):
                with pytest.raises(DataError) as e:
                    call()
                assert _error(e) == message
    finally:
        os.chdir(cwd)


def test_too_few_tokens(tmp_path):
    corpus = tmp_path / "x.txt"
    corpus.write_text("z" * 800)  # 760 train / 40 val bytes
    with pytest.raises(DataError) as e:
        load_data(DataConfig(corpus=str(corpus)), vocab_size=256, seq_len=128)
    assert _error(e) == (
        f"data.corpus: '{corpus}' has 40 validation tokens, fewer than model.seq_len + 1 = 129; "
        "use a larger corpus, a larger data.val_fraction or a smaller model.seq_len"
    )


def test_folder_corpus_order_and_skips(tmp_path):
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "b" / "two.txt").write_text("two")
    (root / "a.txt").write_text("one")
    (root / "c.bin").write_bytes(b"x\0y")  # binary: skipped
    (root / ".hidden").write_text("secret")
    assert read_text(resolve_corpus(str(root))) == "one\n\ntwo"


def test_shakespeare(cache):
    data = load_data(DataConfig(), vocab_size=256, seq_len=128)
    assert (len(data.train), len(data.val)) == (4_804_418, 252_864)
    assert data.description == "shakespeare: 5,057,282 bytes -> 4,804,418 train / 252,864 val tokens (byte)"
    assert data.tokenizer.decode(data.train[:25].tolist()) == "ALL'S WELL THAT ENDS WELL"
    assert [p.suffix for p in sorted(cache.iterdir()) if p.suffix != ".lock"] == [".bin", ".json"]
    check_corpus(DataConfig())


def test_python_corpus_is_the_stdlib():
    corpus = resolve_corpus("python")
    files = source_files(corpus)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)
    text = read_text(corpus)
    assert len(text) > 1_000_000 and "def " in text
