"""Branch-Train-Merge: experts train with zero collectives, merging identical experts changes
nothing, and the evaluation's ensemble is a proper mixture."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from plait.data.corpus import read_text, resolve_corpus
from plait.errors import PlaitError
from plait.btm import workflow as btm
from plait.btm.cli import main as btm_main
from plait.train.trained import load_trained

SMALL = ["model.n_layers=2", "train.global_batch=8", "train.eval_every=0", "train.eval_batches=1",
         "train.sample_tokens=0", "train.threads=1", "log.tensorboard=false", "log.progress=none",
         "optim.warmup_steps=2"]


def write_domains(root: Path) -> list[str]:
    """Two small domains: Shakespeare's text and Python sources (fast to tokenise)."""
    prose = read_text(resolve_corpus("shakespeare"))[:200_000]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join((stdlib / name).read_text() for name in ("argparse.py", "dataclasses.py", "typing.py"))[:200_000]
    paths = []
    for name, text in (("prose.txt", prose), ("code.txt", code)):
        (root / name).write_text(text)
        paths.append(str(root / name))
    return paths


def train_seed(run_dir: Path, corpus: str, steps: int) -> None:
    from plait import config as config_mod
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    cfg = config_mod.load_config("tiny", SMALL + [f"train.steps={steps}", f"data.corpus={corpus}"])
    trainer = Trainer(cfg, run_dir, init_runtime(cfg))
    try:
        trainer.start()
        trainer.fit()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("btm")
    prose, code = write_domains(root)
    train_seed(root / "seed", prose, steps=6)
    assert btm_main(["branch", str(root / "btm"), "--seed", str(root / "seed"), "--domains", f"{prose},{code}",
                     "--steps", "4"]) == 0
    calls = btm.train(root / "btm")
    return root, calls


def test_training_phase_makes_no_collective_calls(experts):
    root, calls = experts
    assert set(calls) == {"expert-0-prose", "expert-1-code"}
    assert all(count == 0 for count in calls.values())
    for name in calls:
        rows = [json.loads(line) for line in (root / "btm" / name / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [7, 8, 9, 10]  # continued from the seed's step 6
        assert all(row["comm_bytes"] == 0 for row in rows)


def test_experts_diverge_and_merging_averages_them(experts):
    root, _ = experts
    a, b = (load_trained(d) for d in btm.expert_dirs(root / "btm"))
    merged_path = btm.merge(root / "btm", [1.0, 3.0])
    merged = load_trained(root / "btm" / "merged")
    assert merged.path == merged_path
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(dict(merged.model.named_parameters())[name], 0.25 * pa + 0.75 * pb, atol=1e-6)
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.model.parameters(), b.model.parameters()))


def test_averaging_identical_experts_returns_the_same_model(experts):
    root, _ = experts
    model = {n: p.detach() for n, p in load_trained(btm.expert_dirs(root / "btm")[0]).model.named_parameters()}
    averaged = btm.average([model, model, model], [1.0, 2.0, 5.0])
    assert all(torch.allclose(averaged[n], model[n], rtol=0, atol=1e-7) for n in model)


def test_eval_reports_every_option_and_the_ensemble_is_a_mixture(experts):
    root, _ = experts
    if not (root / "btm" / "merged").exists():
        btm.merge(root / "btm")
    report = btm.evaluate(root / "btm", windows=6, posterior_windows=2, dense=root / "seed")
    assert set(report["domains"]) == set(btm._read_manifest(root / "btm")["domains"])
    for row in report["domains"].values():
        assert set(row) >= {"expert-0-prose", "expert-1-code", "merged", "dense", "ensemble", "posterior"}
        assert sum(row["posterior"]) == pytest.approx(1.0)
        # -log Σ w p_j <= max_j(-log p_j) token by token (Jensen), so over the windows too.
        assert row["ensemble"] <= max(row["expert-0-prose"], row["expert-1-code"]) * (1 + 1e-9)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(PlaitError, match="no valid checkpoint"):
        btm.branch(tmp_path / "b", tmp_path, ["shakespeare"], 5)
    with pytest.raises(PlaitError, match="not a BTM directory"):
        btm.train(tmp_path)
    with pytest.raises(PlaitError, match="weights"):
        btm.average([{"w": torch.ones(1)}], [1.0, 2.0])
