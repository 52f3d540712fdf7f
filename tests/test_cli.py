"""The command line as users and external checks drive it: exit codes, one-line errors,
and the commands that work on a finished run (sample, plot, export, prepare)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from plait.train.trained import load_trained
from scenarios import BASE

pytestmark = pytest.mark.timeout(300)


def plait(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env=env)


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("plait: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--set", "train.stpes=5"], ["unknown config key 'train.stpes'", "train.steps"]),
    (["--set", "optim.lr=fast"], ["optim.lr='fast' must be a number"]),
    (["--nproc", "4", "--set", "parallel.dp=3"], ["parallel.dp=3 x tp=1 x cp=1 x pp=1 = 3 != world size 4"]),
    (["--nproc", "2", "--set", "model.n_experts=4", "--set", "parallel.etp=2"], ["parallel.etp=2 is not yet supported"]),
    (["no-such-preset"], ["'no-such-preset' is neither a TOML file nor a preset"]),
])
def test_bad_config_exits_2_with_one_line(tmp_path, args, fragments):
    assert_usage_error(plait("train", *args, "--run-dir", str(tmp_path / "run")), *fragments)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_missing_corpus_exits_2(tmp_path):
    result = plait("train", "--nproc", "2", "--run-dir", str(tmp_path / "run"),
                   "--set", f"data.corpus={tmp_path / 'nowhere.txt'}")
    assert_usage_error(result, "data.corpus", "nowhere.txt", "does not exist")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_empty_corpus_exits_2(tmp_path, nproc):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = plait("train", "--nproc", nproc, "--run-dir", str(tmp_path / "run"), "--set", f"data.corpus={empty}")
    assert_usage_error(result, "data.corpus", "empty")


def train_in_process(run_dir: Path, *overrides: str) -> None:
    from plait.config import load_config
    from plait.train.trainer import train

    train(load_config("tiny", BASE + list(overrides)), run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight = tmp_path / "straight"
    train_in_process(straight, "train.steps=12", "checkpoint.every=5")
    run = tmp_path / "run"
    train_in_process(run, "train.steps=10", "checkpoint.every=5")
    model_file = run / "checkpoints" / "step-00000010" / "__0_0.distcp"  # the model's (only) piece file
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncate
    train_in_process(run, "train.steps=12", "checkpoint.every=5")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    corrupt = [e for e in events if e["event"] == "checkpoint_corrupt"]
    assert len(corrupt) == 1 and corrupt[0]["path"].endswith("step-00000010") and "truncated" in corrupt[0]["reason"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed[-1]["step"] == 5 and resumed[-1]["dropped_metric_rows"] == 5
    assert list(losses(run)) == list(range(1, 13))
    assert losses(run) == losses(straight)  # the redone steps are exactly the same steps


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.steps=5", "checkpoint.every=5")
    (run / "checkpoints" / "step-00000005" / "manifest.json").write_text("{")
    result = plait("train", "--nproc", "1", "--run-dir", str(run), "--set", "train.steps=8")
    assert_usage_error(result, "no valid checkpoint", "refusing to start from scratch")
    assert list(losses(run)) == [1, 2, 3, 4, 5]  # the history is untouched


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(run, "train.steps=6")
    return run


def test_sample_prints_text_from_the_latest_checkpoint(finished_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(finished_run), "--prompt", "KING", "--tokens", "30"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and len(text.rstrip("\n")) >= 30


def test_plot_draws_several_runs(finished_run, tmp_path):
    out = tmp_path / "loss.png"
    with pytest.raises(SystemExit):
        main(["plot", str(finished_run), str(finished_run), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_export_writes_hugging_face_llama_names(finished_run, tmp_path):
    out = tmp_path / "hf" / "model.safetensors"
    with pytest.raises(SystemExit):
        main(["export", str(finished_run), "-o", str(out)])
    tensors = load_file(str(out))
    trained = load_trained(finished_run)
    assert torch.equal(tensors["model.layers.3.mlp.down_proj.weight"], trained.model.blocks[3].mlp.w_down.weight)
    assert torch.equal(tensors["model.embed_tokens.weight"], trained.model.embed.weight)
    assert len(tensors) == len(list(trained.model.parameters()))
    config = json.loads((out.parent / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True


def test_prepared_token_file_trains(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    result = plait("prepare", str(text), "-o", str(tmp_path / "corpus.bin"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    train_in_process(run, "train.steps=3", f"data.corpus={tmp_path / 'corpus.bin'}", "train.eval_batches=1")
    assert len(losses(run)) == 3
