"""The run directory: one writer at a time, no change before a resume is accepted, a metrics
history that survives a torn line, strict JSON, and failures that end with one line and
leave what was written as it was."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.config import load_config, to_toml
from plait.errors import CheckpointError, ConfigError, PlaitError
from plait.train import checkpoint as ckpt
from plait.train.metrics import METRICS_FILE, RunLog
from plait.train.resume import check_compatible
from plait.train.rundir import LOCK_FILE, MARKER_FILE, claim_run_dir, finite_or_none, json_text
from scenarios import BASE, read_jsonl, train_cli

pytestmark = pytest.mark.timeout(300)

WORDS = "the king queen crown river stone night morning sword letter garden winter".split()


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every other JSON reader does."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def digest(folder: Path) -> dict[str, str]:
    """Every file's sha256 and every folder under `folder`, by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("plait: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """The shortened tiny model on a small corpus (fast to tokenise, even with bpe)."""
    rng = random.Random(0)
    corpus = tmp_path_factory.mktemp("corpus") / "words.txt"
    corpus.write_text("".join(" ".join(rng.choices(WORDS, k=12)) + ".\n" for _ in range(2000)))
    return BASE + [f"data.corpus={corpus}", "model.vocab_size=260", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, overrides) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("base") / "run"
    result = train_cli(run, overrides + ["train.steps=2"], nproc=1)
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A copy of the base run, for a test to resume from or to spoil."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def test_a_finished_run_holds_the_marker_and_no_lock(base_run):
    assert (base_run / MARKER_FILE).is_file()
    assert not (base_run / LOCK_FILE).exists()  # removed on a clean exit
    assert [r["step"] for r in read_jsonl(base_run / METRICS_FILE)] == [1, 2]


# --- nothing changes until the resume is accepted ---------------------------------------------
@pytest.mark.parametrize("change, nproc, fragments", [
    (["model.dim=64"], 2, ["model.dim=128", "model.dim=64"]),
    (["checkpoint.resume=never"], 1, ["checkpoint.resume=never"]),
    (["data.tokenizer=bpe"], 1, ["data.tokenizer 'byte' -> 'bpe'", "checkpoint.reset_data=true"]),
])
def test_a_refused_resume_leaves_the_run_dir_byte_for_byte(run, overrides, change, nproc, fragments):
    before = digest(run)
    result = train_cli(run, overrides + ["train.steps=3"] + change, nproc=nproc)
    assert_one_line_error(result, 2, *fragments)
    assert digest(run) == before


def test_a_tokenizer_change_with_reset_data_resumes_with_a_warning(run, overrides):
    result = train_cli(run, overrides + ["train.steps=3", "data.tokenizer=bpe", "checkpoint.reset_data=true"], nproc=1)
    assert result.returncode == 0, result.stderr
    warnings = [e["message"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "warning"]
    assert any("tokenizer changed" in w and "data.tokenizer 'byte' -> 'bpe'" in w for w in warnings), warnings
    assert [r["step"] for r in read_jsonl(run / METRICS_FILE)] == [1, 2, 3]


def test_tokenizer_built_anew_from_another_corpus_is_refused(tmp_path):
    cfg = load_config("tiny", ["data.tokenizer=bpe", "model.vocab_size=300"])
    saved = tmp_path / "step-00000001"
    saved.mkdir()
    (saved / "config.toml").write_text(to_toml(cfg))
    (saved / "tokenizer.json").write_text(json.dumps({"type": "bpe", "tokenizers": {"merges": ["a b"]}}))
    with pytest.raises(CheckpointError, match="data.tokenizer 'bpe' built anew from data.corpus"):
        check_compatible(saved, cfg, json.dumps({"type": "bpe", "tokenizers": {"merges": ["c d"]}}))
    cfg.checkpoint.reset_data = True
    warnings = check_compatible(saved, cfg, json.dumps({"type": "bpe", "tokenizers": {"merges": ["c d"]}}))
    assert any("tokenizer changed" in w for w in warnings)
    assert check_compatible(saved, cfg, json.dumps({"type": "bpe", "tokenizers": {"merges": ["a b"]}})) == []


# --- metrics.jsonl on resume --------------------------------------------------------------------
def test_a_torn_last_metrics_line_loses_no_row_on_resume(run, overrides):
    with (run / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # a crash in the middle of step 3's row
    result = train_cli(run, overrides + ["train.steps=4"], nproc=2)
    assert result.returncode == 0, result.stderr
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert not (run / LOCK_FILE).exists()


def test_truncate_metrics_rewrites_whenever_a_line_goes(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert log.truncate_metrics(2) == 0  # nothing to redo, but the torn line must go
    log.metrics({"step": 3})
    log.close()
    assert [strict_json(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2, 3]


def test_a_run_log_creates_nothing_until_it_writes(tmp_path):
    log = RunLog(tmp_path / "run", enabled=True, tensorboard=True)
    log.truncate_metrics(5)
    log.close()
    assert not (tmp_path / "run").exists()


# --- JSON files hold no NaN or Infinity ---------------------------------------------------------
def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.metrics({"step": 1, "loss": float("nan"), "mfu": float("inf"), "moe_load": [[1.0, float("-inf")]]})
    log.event("evaluation", step=1, val_loss=float("nan"))
    log.close()
    row = strict_json((tmp_path / METRICS_FILE).read_text())
    assert row == {"step": 1, "loss": None, "mfu": None, "moe_load": [[1.0, None]]}
    assert strict_json((tmp_path / "events.jsonl").read_text())["val_loss"] is None
    written = ckpt.write_checkpoint(tmp_path / "checkpoints", 1, {"trainer.json": {"loss": float("nan")}})
    assert strict_json((written / "trainer.json").read_text()) == {"loss": None}
    strict_json((written / ckpt.MANIFEST).read_text())
    assert finite_or_none((1, float("nan"))) == [1, None]
    assert json_text({"a": 1.5}) == '{"a": 1.5}'


def test_a_diverging_run_writes_strict_json_and_warns_once(tmp_path, overrides):
    run = tmp_path / "run"
    result = train_cli(run, overrides + ["train.steps=3", "optim.lr=1e30", "optim.warmup_steps=0"], nproc=1)
    assert result.returncode == 0, result.stderr
    rows = [strict_json(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert any(row["loss"] is None for row in rows), rows
    for path in [run / "events.jsonl", *run.glob("checkpoints/*/*.json")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict_json(line)
    warnings = [e for e in read_jsonl(run / "events.jsonl")
                if e["event"] == "warning" and "training loss" in e["message"]]
    assert len(warnings) == 1


# --- which folders may be trained into ----------------------------------------------------------
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_file_as_run_dir_exits_2_with_one_line(tmp_path, overrides, nproc):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    result = train_cli(file, overrides + ["train.steps=1"], nproc=nproc, timeout=60)
    assert_one_line_error(result, 2, str(file), "is a file")
    assert file.read_text() == "mine\n"


def test_a_folder_that_is_not_a_plait_run_needs_force(tmp_path, overrides):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.toml").write_text('[model]\ndim = 64\n[train]\nsteps = 9\n')  # the user's own
    (folder / "notes.txt").write_text("keep me\n")
    before = digest(folder)
    result = train_cli(folder, overrides + ["train.steps=1"], nproc=1, timeout=60)
    assert_one_line_error(result, 2, str(folder), "not a plait run", "--force")
    assert digest(folder) == before
    forced = subprocess.run(
        [sys.executable, "-m", "plait", "train", "--nproc", "1", "--run-dir", str(folder), "--force",
         *[arg for item in overrides + ["train.steps=1"] for arg in ("--set", item)]],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert forced.returncode == 0, forced.stderr
    assert (folder / MARKER_FILE).is_file() and (folder / "notes.txt").read_text() == "keep me\n"


def test_a_legacy_run_without_the_marker_is_still_a_run(run, overrides):
    (run / MARKER_FILE).unlink()
    result = train_cli(run, overrides + ["train.steps=2"], nproc=1)  # already done: nothing to train
    assert result.returncode == 0, result.stderr
    assert (run / MARKER_FILE).is_file()


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "a\\b", "..", ".", "", "a\0b"])
def test_name_must_be_a_plain_file_name(name, tmp_path):
    with pytest.raises(ConfigError, match="name="):
        load_config("tiny", [f"name={json.dumps(name)}"])
    file = tmp_path / "run.toml"
    file.write_text(f"name = {json.dumps(name)}\n")
    with pytest.raises(ConfigError, match="name="):
        load_config(str(file))


def test_a_name_that_climbs_out_of_runs_exits_2_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "plait", "train", "--nproc", "1", "--set", "name=../escaped"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert_one_line_error(result, 2, "name='../escaped'")
    assert list(tmp_path.iterdir()) == []


# --- one writer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_train_into_a_locked_run_dir_exits_2_naming_the_holder(run, overrides, nproc):
    with claim_run_dir(run):
        before = digest(run)
        result = train_cli(run, overrides + ["train.steps=3"], nproc=nproc, timeout=60)
        assert_one_line_error(result, 2, f"pid {os.getpid()}", f"host {socket.gethostname()}")
        assert digest(run) == before


def test_under_torchrun_global_rank_0_takes_the_lock(run, overrides):
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with claim_run_dir(run):
        result = subprocess.run(
            [sys.executable, "-m", "plait", "train", "--run-dir", str(run),
             *[arg for item in overrides for arg in ("--set", item)]],
            capture_output=True, text=True, timeout=60, env={**os.environ, **torchrun, "PYTHONWARNINGS": "ignore"})
        assert_one_line_error(result, 2, f"pid {os.getpid()}")


def test_the_lock_is_exclusive_and_released(tmp_path):
    run = tmp_path / "runs" / "a"
    lock = claim_run_dir(run)
    assert strict_json((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(PlaitError, match=f"in use by plait pid {os.getpid()} on host"):
        claim_run_dir(run)
    lock.release()
    assert not (tmp_path / "runs").exists()  # nothing was written: the folders it made are gone
    with claim_run_dir(run):
        (run / "config.toml").write_text("")
    assert not (run / LOCK_FILE).exists() and (run / "config.toml").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": "node7"}))
    with claim_run_dir(tmp_path) as lock:
        assert lock.previous_holder == f"pid {gone.pid} on host node7"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plait: warning:") and f"pid {gone.pid} on host node7" in lines[0]


# --- a checkpoint that cannot be written --------------------------------------------------------
def test_a_failed_checkpoint_write_leaves_the_checkpoints_as_they_were(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 1, {"model.pt": {"w": torch.ones(3)}, "trainer.json": {"step": 1}})
    before = digest(root)

    def disk_full(obj, f, *args, **kwargs):  # as torch.save fails: the OSError, then its own RuntimeError
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    for step in (2, 1):  # a new step, and re-saving an existing one (the swap)
        with pytest.raises(OSError) as failure:
            ckpt.write_checkpoint(root, step, {"model.pt": {"w": None}, "trainer.json": {"step": step}})
        assert failure.value.errno == errno.ENOSPC and failure.value.filename.endswith("model.pt")
        assert digest(root) == before  # no temporary folder, step 1 untouched


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int, read_only: bool = False):
    """A tmpfs of `size_bytes` at `path` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_checkpoints(run, overrides, tmp_path):
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", used + 2_000_000) as disk:  # room for rows, not a checkpoint
        shutil.copytree(run, disk / "run")
        before = digest(disk / "run" / "checkpoints")
        result = train_cli(disk / "run", overrides + ["train.steps=3"], nproc=2)
        assert_one_line_error(result, 1, "No space left on device", str(disk / "run"))
        assert digest(disk / "run" / "checkpoints") == before
        assert not (disk / "run" / LOCK_FILE).exists()
        assert "fault_detected" not in (disk / "run" / "events.jsonl").read_text()  # never restarted


def test_an_unwritable_run_dir_exits_1_with_one_line(tmp_path, overrides):
    with small_disk(tmp_path / "readonly", 1_000_000, read_only=True) as disk:
        result = train_cli(disk / "run", overrides + ["train.steps=1"], nproc=2, timeout=60)
        assert_one_line_error(result, 1, "Read-only file system", str(disk / "run"))
