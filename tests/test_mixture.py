"""data.mix: several corpora mixed by weight, the sample order a pure function of (seed, step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from plait import config as config_mod
from plait.config import DataConfig
from plait.data import MixtureSampler, load_data, make_sampler, prepare
from plait.data.sampler import MIX_BLOCK, block_quota, get_batch
from plait.errors import ConfigError, DataError
from scenarios import read_jsonl, train_cli

SIZES = [50_001, 7_777, 120_003]  # tokens of three corpora laid end to end
WEIGHTS = [0.5, 0.3, 0.2]
SEQ, BATCH, SEED = 16, 8, 3


def _source_of(starts: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), starts, side="right")


def test_each_source_gets_its_weight_of_the_tokens_over_1000_steps():
    sampler = MixtureSampler(SIZES, WEIGHTS, SEQ, BATCH, SEED)
    starts = np.concatenate([sampler.global_batch_starts(step) for step in range(1, 1001)])
    sources = _source_of(starts)
    shares = np.bincount(sources, minlength=3) * SEQ / (len(starts) * SEQ)
    assert np.all(np.abs(shares - WEIGHTS) <= 0.02 * np.array(WEIGHTS)), shares
    # Every window lies inside its own corpus, on that corpus's window grid.
    offsets = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    local = starts - offsets[sources]
    assert np.all(local % SEQ == 0) and np.all(local + SEQ + 1 <= np.array(SIZES)[sources])
    # The small corpus (486 windows, drawn 2,400 times) goes through whole epochs: each of its
    # windows once before any twice.
    small = local[sources == 1][:486]
    assert len(np.unique(small)) == 486


def test_resuming_at_step_500_on_another_layout_gives_the_same_batches():
    straight = MixtureSampler(SIZES, WEIGHTS, SEQ, BATCH, SEED)
    expected = {step: straight.global_batch_starts(step) for step in range(1, 521)}
    resumed = MixtureSampler(SIZES, WEIGHTS, SEQ, BATCH, SEED)  # a new process: nothing carried over
    for step in range(500, 521):
        batch = resumed.global_batch_starts(step)
        assert batch.tolist() == expected[step].tolist()
        # Another layout takes other rows of the same global batch (trainer._micro_batches).
        for dp in (1, 2, 3, 4):
            rows = [np.array_split(batch, dp)[rank] for rank in range(dp)]
            assert np.concatenate(rows).tolist() == expected[step].tolist()
    assert MixtureSampler(SIZES, WEIGHTS, SEQ, BATCH, SEED + 1).global_batch_starts(500).tolist() != \
        expected[500].tolist()


def test_block_quota_and_too_small_weights():
    assert block_quota([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert sum(block_quota([1, 1, 1], MIX_BLOCK)) == MIX_BLOCK
    with pytest.raises(DataError, match="too small to sample"):
        MixtureSampler(SIZES, [1.0, 1e-6, 1.0], SEQ, BATCH, SEED)


def _prepare(tmp_path: Path, name: str, text: str, n_docs: int, tokenizer: str = "byte") -> Path:
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": f"{text} {i}. " * 40}) + "\n" for i in range(n_docs)))
    out = tmp_path / name
    assert prepare.main([str(source), "-o", str(out), "--tokenizer", tokenizer, "--val-fraction", "0.1"]) == 0
    return out


def test_mix_config_loads_and_trains_at_dp2(tmp_path):
    a = _prepare(tmp_path, "prose", "It was a dark and stormy night", 40)
    b = _prepare(tmp_path, "code", "def f(x): return x + 1", 30)
    cfg = config_mod.load_config("tiny", [f'data.mix={{"{a}" = 3, "{b}" = 1}}', "model.vocab_size=257"])
    assert cfg.data.mix == {str(a): 3.0, str(b): 1.0}
    assert config_mod.load_config(None, ["data.mix={a=1}"]).data.mix == {"a": 1.0}
    with pytest.raises(ConfigError, match="must be a number"):
        config_mod.load_config(None, ['data.mix={a="x"}'])
    data = load_data(cfg.data, vocab_size=257, seq_len=64)
    assert [(Path(n).name, w) for n, _, w in data.mixture] == [("prose", 0.75), ("code", 0.25)]
    assert data.description.startswith("mix of 2 corpora")
    sampler = make_sampler(data, 64, 8, 0)
    assert isinstance(sampler, MixtureSampler)
    inputs, _ = get_batch(data.train, sampler.global_batch_starts(1), 64)
    assert inputs.shape == (8, 64) and int(inputs.max()) <= 256

    run = tmp_path / "run"
    mix = f'data.mix={{"{a}" = 3, "{b}" = 1}}'
    done = train_cli(run, ["train.steps=3", "train.global_batch=4", "train.micro_batch=2", "train.eval_every=3",
                           "train.eval_batches=1", "train.sample_tokens=0", "train.threads=1", "model.seq_len=64",
                           "model.vocab_size=257", "checkpoint.every=0", "log.tensorboard=false",
                           "log.progress=none", mix], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 3 and rows[-1]["val_loss"] is not None


def test_a_mix_needs_one_tokenizer(tmp_path):
    a = _prepare(tmp_path, "a", "alpha beta", 20)
    b = _prepare(tmp_path, "b", "gamma delta", 20, tokenizer="bpe")
    with pytest.raises(DataError, match="has another tokenizer than"):
        load_data(DataConfig(mix={str(a): 1.0, str(b): 1.0}), vocab_size=5000, seq_len=16)
    with pytest.raises(DataError, match="must be > 0"):
        load_data(DataConfig(mix={str(a): 0.0}), vocab_size=5000, seq_len=16)
