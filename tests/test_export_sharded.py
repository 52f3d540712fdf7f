"""`plait export` and `plait sample` on sharded (DCP) checkpoints (issue 18).

A run in a parallel layout writes the same state twice: as a sharded checkpoint (every rank its
own pieces, as training will) and in the v1 form (full tensors in model.pt). Both must export
to the same Hugging Face files, split into shards with an index when the model is larger than
--max-shard-size, holding exactly the run's gathered weights, and sample the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from distributed import run_on_ranks
from plait import config as config_mod
from plait.cli import main
from plait.data.tokenizer import ByteTokenizer
from plait.export import hf_name, plan_shards
from plait.model import build_model, count_parameters
from plait.outputs import parse_size
from plait.parallel.pieces import MODEL, OPTIMIZER, STEP_KEY, Piece
from plait.train import checkpoint as ckpt
from plait.train.resume import TrainState, checkpoint_files
from plait.train.sharded import save_pieces
from plait.train.trained import load_trained
from scenarios import BASE

pytestmark = pytest.mark.timeout(300)

STEP = 2
LAYOUTS = {  # every form of sharding a checkpoint's pieces can come from: tp slices, pp stages, ZeRO ranges
    "tp2_pp2_zero3": ["parallel.tp=2", "parallel.pp=2", "parallel.zero=3"],
    "dp4_zero3": ["parallel.zero=3"],
}
SHARD = "1MB"  # the tiny model's ~3.3 MB of fp32 weights: a few shards


def small_files(cfg: config_mod.Config, step: int) -> dict:
    """What a checkpoint holds beside the weights (as resume.checkpoint_files writes them)."""
    files = checkpoint_files({}, {}, TrainState(step=step, tokens=0), cfg, [], ByteTokenizer().to_json(), "test")
    return {name: files[name] for name in ("trainer.json", "config.toml", "tokenizer.json")}


def commit(run_dir: Path, step: int, cfg: config_mod.Config) -> Path:
    """Rank 0, once every rank's pieces are in the temporary folder: the small files, the manifest."""
    root = run_dir / "checkpoints"
    written = ckpt.sharded_temp_dir(root, step)
    entries = {p.name: ckpt.file_entry(p) for p in written.glob("*.distcp")}
    return ckpt.commit_sharded(root, step, entries, small_files(cfg, step))


def write_both_forms(rank: int, world_size: int, overrides: list[str], tmp: str) -> dict | None:
    """Train two steps in a layout, then save the state sharded (every rank) and as v1 (rank 0)."""
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    tmp_path = Path(tmp)
    cfg = config_mod.load_config("tiny", BASE + [f"train.steps={STEP}", "checkpoint.every=0"] + overrides)
    trainer = Trainer(cfg, tmp_path / "train", init_runtime(cfg))
    try:
        trainer.start()
        trainer.fit()
        sharded = tmp_path / "sharded" / "checkpoints"
        if rank == 0:
            ckpt.sharded_temp_dir(sharded, STEP).mkdir(parents=True)
        dist.barrier()
        save_pieces(ckpt.sharded_temp_dir(sharded, STEP), trainer.parallel.state_pieces(), dist.group.WORLD)
        params, optim = trainer.parallel.full_state()
        if rank == 0:
            commit(tmp_path / "sharded", STEP, cfg)
            files = checkpoint_files(params, optim, TrainState(step=STEP, tokens=0), cfg, [torch.get_rng_state()],
                                     ByteTokenizer().to_json(), "test")
            ckpt.write_checkpoint(tmp_path / "v1" / "checkpoints", STEP, files)
        dist.barrier()
    finally:
        trainer.close()
    # numpy: tensors would cross to the test process through shared memory, which a worker
    # that has already exited cannot hand over.
    return {n: t.detach().float().numpy() for n, t in params.items()} if rank == 0 else None


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def runs(request, tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(sharded run dir, v1 run dir, the gathered full parameters) of one layout's run."""
    tmp = tmp_path_factory.mktemp(request.param)
    full = run_on_ranks(4, write_both_forms, LAYOUTS[request.param], str(tmp))[0]
    return tmp / "sharded", tmp / "v1", full


def export(run_dir: Path, out: Path, *args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run_dir), "-o", str(out), *args])
    assert exit_info.value.code == 0


def test_export_of_a_sharded_checkpoint_writes_indexed_shards_of_the_runs_weights(runs, tmp_path, capsys):
    sharded, v1, full = runs
    out = tmp_path / "hf" / "model.safetensors"
    capsys.readouterr()
    export(sharded, out, "--max-shard-size", SHARD)
    _, err = capsys.readouterr()
    assert err.splitlines() == [f"plait: using checkpoint {sharded / 'checkpoints' / ckpt.step_dir_name(STEP)} "
                                f"(step {STEP})"]  # nothing else: no warning from DCP
    index = json.loads((out.parent / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not out.exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(files + ["config.json", index_name(out)])

    expected = {hf_name(n): torch.from_numpy(v) for n, v in full.items()}
    seen: dict[str, torch.Tensor] = {}
    for name in files:
        tensors = load_file(str(out.parent / name))
        assert all(index["weight_map"][k] == name for k in tensors)
        assert not set(tensors) & set(seen)  # every tensor in one file only
        # a shard passes the limit only when it is one tensor larger than it
        assert sum(t.nbytes for t in tensors.values()) <= parse_size(SHARD) or len(tensors) == 1
        seen.update(tensors)
    assert set(seen) == set(expected) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    for name, tensor in expected.items():
        assert seen[name].dtype == torch.float32 and torch.equal(seen[name], tensor), name

    # The v1 form of the same weights exports to the same bytes.
    from_v1 = tmp_path / "from-v1" / "model.safetensors"
    export(v1, from_v1, "--max-shard-size", SHARD)
    assert sorted(p.name for p in from_v1.parent.iterdir()) == sorted(p.name for p in out.parent.iterdir())
    for path in out.parent.iterdir():
        assert same_file(path, from_v1.parent / path.name), path.name


def index_name(out: Path) -> str:
    return out.name + ".index.json"


def same_file(a: Path, b: Path) -> bool:
    """Same text, or same safetensors: tensors and metadata (safetensors writes its metadata in
    no fixed order, so the bytes may differ)."""
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def test_a_model_within_one_shard_is_one_file_as_before(runs, tmp_path):
    sharded, v1, full = runs
    for run_dir, folder in ((sharded, "a"), (v1, "b")):
        out = tmp_path / folder / "model.safetensors"
        export(run_dir, out)  # the default, 5GB
        assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", "model.safetensors"]
    assert same_file(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")


def test_sample_reads_a_sharded_checkpoint_as_its_v1_form(runs, capsys):
    sharded, v1, full = runs
    texts = []
    for run_dir in (sharded, v1):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", str(run_dir), "--prompt", "KING", "--tokens", "40"])
        assert exit_info.value.code == 0
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"plait: using checkpoint {run_dir / 'checkpoints' / ckpt.step_dir_name(STEP)} "
                                    f"(step {STEP})"]
        texts.append(out)
    assert texts[0] == texts[1] and texts[0].startswith("KING")
    model = load_trained(sharded).model
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.from_numpy(full[name])), name
    assert model.lm_head.weight is model.embed.weight  # the tie survives loading piece by piece


def test_transformers_loads_the_shards_and_computes_plaits_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    sharded, _, _ = runs
    out = tmp_path / "hf" / "model.safetensors"
    export(sharded, out, "--max-shard-size", SHARD)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out.parent)).float().eval()
    model = load_trained(sharded).model.eval()
    tokens = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
        ours = model(tokens)
    # fp32 both; the two implementations order their sums differently
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


# --- which checkpoint: the same choice and messages as for v1 ------------------------------


class RunsACommand:
    """Unpickling this runs `touch <marker>`: what a hostile .metadata would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_with_manifest(checkpoint: Path, name: str, content: bytes) -> None:
    """Replace a file of a checkpoint and fix its manifest, as a deliberate forger would."""
    (checkpoint / name).write_bytes(content)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def run_plait(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_info.value.code, err.splitlines()


@pytest.mark.parametrize("damage", ["truncated", "hostile metadata", "forged tensor file"])
def test_an_unusable_sharded_checkpoint_is_passed_over_and_named(runs, tmp_path, capsys, damage):
    sharded, _, _ = runs
    run = Path(shutil.copytree(sharded, tmp_path / "run"))
    older = run / "checkpoints" / ckpt.step_dir_name(STEP)
    newest = Path(shutil.copytree(older, run / "checkpoints" / ckpt.step_dir_name(STEP + 1)))
    data = sorted(newest.glob("*.distcp"))[0]
    marker = tmp_path / "pwned"
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
        why = f"({data.name} has 1000 bytes, the manifest says"
    elif damage == "hostile metadata":
        rewrite_with_manifest(newest, ".metadata", pickle.dumps(RunsACommand(marker)))
        why = "(.metadata fails the safe load: UnpicklingError"
    else:
        rewrite_with_manifest(newest, data.name, os.urandom(data.stat().st_size))
        why = "(model/embed.weight does not load: "
    out = tmp_path / "hf" / "model.safetensors"
    code, err = run_plait(capsys, "sample", run, "--tokens", "5")
    assert code == 0 and len(err) == 2, err
    assert err[0].startswith(f"plait: warning: checkpoint {newest} is unusable {why}"), err
    assert err[0].endswith(f"; using {older}") and err[1] == f"plait: using checkpoint {older} (step {STEP})"
    code, err = run_plait(capsys, "export", run, "-o", out)
    if damage == "forged tensor file":
        # export reads each tensor once, while writing: a file that passes its checksum yet does
        # not decode is found then, and ends the export with one line and nothing written
        assert code == 2 and len(err) == 1 and err[0].startswith(f"plait: error: checkpoint {newest}: model/"), err
        assert not out.parent.exists() or not any(out.parent.iterdir())
    else:
        assert code == 0 and err[0].startswith(f"plait: warning: checkpoint {newest} is unusable {why}"), err
        assert err[1] == f"plait: using checkpoint {older} (step {STEP})"
    assert not marker.exists()


# --- export's peak memory --------------------------------------------------------------------

BIG = ["model.dim=512", "model.n_layers=10", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=1536"]


def write_big_checkpoints(tmp: Path) -> tuple[Path, Path, int]:
    """A ~32M-parameter model with AdamW moments, sharded (each tensor in two boxes, as two
    ranks would hold it) and as v1; returns both run dirs and the fp32 weights' bytes."""
    cfg = config_mod.load_config("tiny", BASE + BIG)
    model = build_model(cfg.model, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    optim = {n: {"exp_avg": torch.full_like(p, 0.5), "exp_avg_sq": torch.full_like(p, 0.25)}
             for n, p in params.items()}
    pieces = [Piece(STEP_KEY, (), (), torch.tensor(float(STEP)), True)]
    for name, p in params.items():
        for key, tensor in [(f"{MODEL}/{name}", p)] + [(f"{OPTIMIZER}/{name}/{k}", v) for k, v in optim[name].items()]:
            half = tensor.shape[0] // 2
            pieces += [Piece(key, tuple(tensor.shape), (0,) * tensor.dim(), tensor[:half], True),
                       Piece(key, tuple(tensor.shape), (half,) + (0,) * (tensor.dim() - 1), tensor[half:], True)]
    temp = ckpt.sharded_temp_dir(tmp / "sharded" / "checkpoints", STEP)
    temp.mkdir(parents=True)
    save_pieces(temp, pieces, None)
    commit(tmp / "sharded", STEP, cfg)
    files = checkpoint_files(params, {n: {**s, "step": torch.tensor(float(STEP))} for n, s in optim.items()},
                             TrainState(step=STEP), cfg, [torch.get_rng_state()], ByteTokenizer().to_json(), "test")
    ckpt.write_checkpoint(tmp / "v1" / "checkpoints", STEP, files)
    return tmp / "sharded", tmp / "v1", count_parameters(model) * 4


def peak_rss_bytes(code: str) -> int:
    """The peak resident memory of `python -c code`, measured by a parent of its own (so no
    earlier child of this test process counts)."""
    probe = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", probe, code], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def test_export_memory_is_about_one_shard_not_the_model(tmp_path):
    sharded, v1, model_bytes = write_big_checkpoints(tmp_path)
    assert model_bytes >= 30_000_000 * 4
    # Everything but the weights: the imports, and a model built on the meta device (which
    # imports torch._dynamo, ~110 MiB whatever the model's size).
    baseline = peak_rss_bytes("import torch, safetensors.torch, plait.cli, plait.export, plait.train.trained; "
                              "from plait.config import load_config; from plait.model.llama import Transformer; "
                              "torch.device('meta').__enter__(); Transformer(load_config('tiny').model)")

    def export_peak(run_dir: Path, out: Path) -> int:
        argv = ["export", str(run_dir), "-o", str(out), "--max-shard-size", "16MB"]
        return peak_rss_bytes(f"import sys; from plait.cli import main; main({argv!r})") - baseline

    from_sharded = export_peak(sharded, tmp_path / "a" / "model.safetensors")
    from_v1 = export_peak(v1, tmp_path / "b" / "model.safetensors")
    mib = 2**20
    print(f"\nmodel {model_bytes / mib:.0f} MiB fp32 ({model_bytes // 4 / 1e6:.1f}M parameters), shards of 16MB; "
          f"export peak above the imports: sharded checkpoint {from_sharded / mib:.0f} MiB, "
          f"v1 checkpoint {from_v1 / mib:.0f} MiB (baseline {baseline / mib:.0f} MiB)")
    # Measured: ~25 MiB (one shard, one tensor being read); the v1 form ~2x the model.
    assert from_sharded < model_bytes  # far from the model plus its copy, with room for the allocator
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == model_bytes
    for name in sorted(set(index["weight_map"].values())):
        assert same_file(tmp_path / "a" / name, tmp_path / "b" / name)


def test_plan_and_sizes():
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1000", "1.5kb", "3 MiB")] == [
        5 * 10**9, 500 * 10**6, 2 * 2**30, 1000, 1500, 3 * 2**20]
    for bad in ("", "five", "-1", "0", "5 PB"):
        with pytest.raises(Exception, match="--max-shard-size"):
            parse_size(bad)
    assert plan_shards([("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 3)], 8) == [["a", "b"], ["c"], ["d", "e"]]


def test_a_bad_shard_size_is_one_line_before_anything_is_read(capsys, tmp_path):
    code, err = run_plait(capsys, "export", tmp_path / "no-run", "-o", tmp_path / "hf" / "model.safetensors",
                          "--max-shard-size", "5PB")
    assert code == 2 and err == ["plait: error: --max-shard-size '5PB' is not a size: give bytes or e.g. 500MB, "
                                 "2GB, 1GiB"]
