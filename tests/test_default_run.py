"""The README's first command, as a user runs it: `plait train` with no arguments trains the
tiny preset on 2 local processes, learns, writes the run directory and prints a sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from plait.config import DataConfig, load_config
from plait.data import load_data

pytestmark = pytest.mark.timeout(600)


def unigram_entropy_nats(tokens: np.ndarray) -> float:
    counts = np.bincount(np.asarray(tokens)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_default_training_run_learns_shakespeare(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "plait", "train", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = tmp_path / "run"
    steps = load_config("tiny").train.steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert "dp=2" in result.stdout  # two processes, through the elastic launcher
    required = {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "mfu",
                "state_bytes", "peak_mem_bytes", "comm_bytes"}
    assert all(required <= set(r) for r in rows)
    assert rows[-1]["tokens"] == steps * 16 * 128

    val_entropy = unigram_entropy_nats(load_data(DataConfig(), 256, 128).val)
    final_val = rows[-1]["val_loss"]
    # A model that learned only letter frequencies would sit at the unigram entropy (3.28
    # nats); a character model that has learned words and layout is far below it.
    assert final_val < 0.7 * val_entropy, (final_val, val_entropy)
    assert rows[-1]["loss"] < rows[0]["loss"] - 3

    assert (run / "config.toml").is_file() and (run / "events.jsonl").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / f"step-{steps:08d}" / "manifest.json").is_file()
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finished" and "checkpoint_saved" in events
    sample = result.stdout.split(f"--- sample after {steps} steps ---", 1)[1]
    assert len(sample.strip()) > 100
