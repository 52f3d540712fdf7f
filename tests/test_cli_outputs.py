"""What `plot`, `export`, `prepare` and `sample` write, and what they refuse (issue 15).

A mistake on the command line ends with exit status 2 and one line naming it; a machine that
refuses a write ends with exit status 1 and one line; neither prints a traceback nor changes a
file that was already there. sample and export say which checkpoint they use, and why a newer
one was passed over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from plait.cli import main
from scenarios import BASE, train_cli

pytestmark = pytest.mark.timeout(300)

NEWEST = "step-00000002"
OLDER = "step-00000001"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("outputs") / "run"
    result = train_cli(run, BASE + ["train.steps=2", "checkpoint.every=1"], nproc=1)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [OLDER, NEWEST]
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@dataclass
class Result:
    code: int
    out: str
    err: list[str]


@pytest.fixture
def plait(capsys):
    """`plait ARGS...` run in this process: exit status, stdout and the lines of stderr."""
    def run_plait(*args: str | Path) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return Result(exit_info.value.code, out, err.splitlines())
    return run_plait


def assert_one_line(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, result.err
    assert len(result.err) == 1, result.err
    assert result.err[0].startswith("plait: error: "), result.err
    for fragment in fragments:
        assert fragment in result.err[0], result.err


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too, so a leftover temporary file shows) and its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_with_manifest(checkpoint: Path, name: str, content: bytes) -> None:
    """Replace a file of a checkpoint and fix its manifest, as a deliberate forger would."""
    (checkpoint / name).write_bytes(content)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


class RunsACommand:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- plot ------------------------------------------------------------------------------------


def test_plot_refuses_a_file_that_is_not_an_image(plait, run, tmp_path):
    notes = tmp_path / "x.txt"
    notes.write_text("my notes")
    assert_one_line(plait("plot", run, "-o", notes), 2, "-o", "x.txt", ".png")
    assert notes.read_text() == "my notes"
    assert_one_line(plait("plot", run, "-o", tmp_path / "loss"), 2, "-o", "loss")
    assert not (tmp_path / "loss").exists() and not (tmp_path / "loss.png").exists()


def test_plot_refuses_a_directory(plait, run, tmp_path):
    (tmp_path / "plots.png").mkdir()
    assert_one_line(plait("plot", run, "-o", tmp_path / "plots.png"), 2, "-o", "plots.png", "is a directory")


def test_plot_into_an_unwritable_place_is_one_line_exit_1(plait, run, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = plait("plot", run, "-o", tmp_path / "a-file" / "loss.png")
    assert_one_line(result, 1, "a-file")


def test_a_failed_plot_keeps_the_old_image_whole(plait, run, tmp_path):
    out = tmp_path / "loss.png"
    assert plait("plot", run, "-o", out).code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = digest(tmp_path)
    (tmp_path / "no-metrics").mkdir()
    assert_one_line(plait("plot", run, tmp_path / "no-metrics", "-o", out), 2, "no metrics")
    assert plait("plot", run, "-o", tmp_path / "loss.svg").code == 0  # other formats than PNG
    assert {k: v for k, v in digest(tmp_path).items() if k in before} == before


# --- export ----------------------------------------------------------------------------------


def test_export_refuses_a_directory_and_writes_nothing(plait, run, tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    before = digest(run)
    assert_one_line(plait("export", run, "-o", target), 2, "-o", str(target), "is a directory")
    assert list(target.iterdir()) == [] and digest(run) == before


def test_export_overwrites_only_with_force(plait, run, tmp_path):
    out = tmp_path / "hf" / "model.safetensors"
    first = plait("export", run, "-o", out)
    assert first.code == 0, first.err
    assert first.err == [f"plait: using checkpoint {run / 'checkpoints' / NEWEST} (step 2)"]
    out.write_bytes(b"the user's own file")
    before = digest(tmp_path / "hf")
    assert_one_line(plait("export", run, "-o", out), 2, "-o", str(out), "already exists", "--force")
    assert digest(tmp_path / "hf") == before
    assert plait("export", run, "-o", out, "--force").code == 0
    assert "model.layers.0.mlp.up_proj.weight" in load_file(str(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", "model.safetensors"]  # no temporary files


def test_export_never_replaces_another_models_config_json(plait, run, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 4096}')
    before = digest(folder)
    assert_one_line(plait("export", run, "-o", folder / "model.safetensors"), 2, "config.json", "--force")
    assert digest(folder) == before  # not even the model file was written
    assert plait("export", run, "-o", folder / "model.safetensors", "--force").code == 0
    assert json.loads((folder / "config.json").read_text())["hidden_size"] != 4096


def test_export_beside_the_same_models_config_json_leaves_it(plait, run, tmp_path):
    folder = tmp_path / "hf"
    assert plait("export", run, "-o", folder / "a.safetensors").code == 0
    config = (folder / "config.json").read_bytes()
    second = plait("export", run, "-o", folder / "b.safetensors")
    assert second.code == 0 and second.out.strip() == f"wrote {folder / 'b.safetensors'}"
    assert (folder / "config.json").read_bytes() == config


def test_export_into_an_unwritable_place_is_one_line_exit_1(plait, run, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = plait("export", run, "-o", tmp_path / "a-file" / "model.safetensors")
    assert result.code == 1 and result.err[-1].startswith("plait: error: ") and "a-file" in result.err[-1]
    assert (tmp_path / "a-file").read_text() == "x"


# --- prepare ---------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text corpus in a folder of its own (prepare caches its BPE beside it)."""
    text = tmp_path / "corpus" / "corpus.txt"
    text.parent.mkdir()
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return text


def test_prepare_refuses_a_directory(plait, corpus, tmp_path):
    (tmp_path / "tokens.bin").mkdir()
    assert_one_line(plait("prepare", corpus, "-o", tmp_path / "tokens.bin"), 2, "-o", "tokens.bin", "is a directory")
    assert list((tmp_path / "tokens.bin").iterdir()) == []


def test_prepare_overwrites_only_with_force(plait, corpus, tmp_path):
    out = tmp_path / "out" / "tokens.bin"
    assert plait("prepare", corpus, "-o", out).code == 0
    before = digest(out.parent)
    corpus.write_text("a different corpus\n" * 100)
    assert_one_line(plait("prepare", corpus, "-o", out), 2, "-o", str(out), "already exists", "--force")
    assert digest(out.parent) == before
    assert plait("prepare", corpus, "-o", out, "--force").code == 0
    assert json.loads((out.parent / "tokens.bin.json").read_text())["n_tokens"] == len("a different corpus\n") * 100
    assert sorted(digest(out.parent)) == ["tokens.bin", "tokens.bin.json"]  # no temporary files


def test_prepare_refuses_to_replace_a_lone_sidecar(plait, corpus, tmp_path):
    (tmp_path / "tokens.bin.json").write_text("{}")
    assert_one_line(plait("prepare", corpus, "-o", tmp_path / "tokens.bin"), 2, "tokens.bin.json", "--force")
    assert (tmp_path / "tokens.bin.json").read_text() == "{}" and not (tmp_path / "tokens.bin").exists()


# --- which checkpoint sample and export use --------------------------------------------------


def test_sample_says_which_checkpoint_it_uses(plait, run):
    result = plait("sample", run, "--tokens", "5")
    assert result.code == 0
    assert result.err == [f"plait: using checkpoint {run / 'checkpoints' / NEWEST} (step 2)"]


@pytest.mark.parametrize("damage", ["truncated", "not tensors", "hostile pickle", "garbage with manifest"])
def test_sample_and_export_pass_over_an_unusable_newest_checkpoint_and_say_so(plait, run, tmp_path, damage):
    newest, older = run / "checkpoints" / NEWEST, run / "checkpoints" / OLDER
    marker = tmp_path / "pwned"
    # A sharded checkpoint: the pieces file (the manifest catches a truncated one) and the
    # metadata that says what is where (read with a safe unpickler before anything else).
    pieces, metadata = "__0_0.distcp", ".metadata"
    damaged = pieces if damage == "truncated" else metadata
    if damage == "truncated":
        (newest / pieces).write_bytes((newest / pieces).read_bytes()[:1000])
    elif damage == "not tensors":
        rewrite_with_manifest(newest, metadata, pickle.dumps(argparse.Namespace(weights=[1, 2])))
    elif damage == "hostile pickle":
        rewrite_with_manifest(newest, metadata, pickle.dumps(RunsACommand(marker)))
    else:
        rewrite_with_manifest(newest, metadata, os.urandom(4096))
    before = digest(run)
    for args in (["sample", run, "--tokens", "5"], ["export", run, "-o", tmp_path / "hf" / "model.safetensors"]):
        result = plait(*args)
        assert result.code == 0, result.err
        assert len(result.err) == 2, result.err
        assert result.err[0].startswith(f"plait: warning: checkpoint {newest} is unusable ({damaged}")
        assert result.err[0].endswith(f"; using {older}")
        assert result.err[1] == f"plait: using checkpoint {older} (step 1)"
    assert not marker.exists()  # the hostile pickle was refused, not run
    assert digest(run) == before


def test_no_usable_checkpoint_is_one_line_exit_2(plait, run, tmp_path):
    marker = tmp_path / "pwned"
    rewrite_with_manifest(run / "checkpoints" / NEWEST, ".metadata", pickle.dumps(RunsACommand(marker)))
    (run / "checkpoints" / OLDER / "manifest.json").write_text("{")
    before = digest(run)
    out = tmp_path / "hf" / "model.safetensors"
    for args in (["sample", run], ["export", run, "-o", out]):
        assert_one_line(plait(*args), 2, "no valid checkpoint", f"{NEWEST}: .metadata fails the safe load",
                        f"{OLDER}: manifest.json is unreadable")
    assert not marker.exists() and not out.parent.exists()
    assert digest(run) == before


def test_a_real_process_prints_no_traceback_for_a_hostile_checkpoint(run, tmp_path):
    """The same through `python -m plait`, as a user runs it: warnings filtered the same way."""
    marker = tmp_path / "pwned"
    rewrite_with_manifest(run / "checkpoints" / NEWEST, ".metadata", pickle.dumps(RunsACommand(marker)))
    shutil.rmtree(run / "checkpoints" / OLDER)
    result = subprocess.run([sys.executable, "-m", "plait", "sample", str(run)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"plait: error: no valid checkpoint in {run / 'checkpoints'} "
        f"({NEWEST}: .metadata fails the safe load: UnpicklingError)"
    ]
    assert not marker.exists()
