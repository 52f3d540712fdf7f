"""Pipeline parallelism in the trainer: every schedule at pp 2 and 4, combined with data, tensor
and context parallelism and ZeRO, tied and untied embeddings, an uneven split; the same losses
as the single-process run, and checkpoints that move between pipeline and other layouts."""

from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from scenarios import run_many

pytestmark = pytest.mark.timeout(900)

SMALL = ["train.global_batch=8", "train.micro_batch=2"]  # for the quick tied-embedding check
DEEP = ["model.n_layers=8"]  # pp 4 x 2 virtual stages needs 8 layers
UNTIED = ["model.tie_embeddings=false"]
SCHEDULES = {
    "gpipe": ["parallel.pp_schedule=gpipe"],
    "1f1b": ["parallel.pp_schedule=1f1b"],
    "interleaved": ["parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"],
    "zb": ["parallel.pp_schedule=zb"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")

    def job(name, *overrides):
        # The shared test configuration (global batch 16 in micro-batches of 4): 4 micro-batches
        # through the pipeline at dp 1, 2 at dp 2, and the same model the other layout tests use.
        return (name, [o for group in overrides for o in group], str(root / name))

    checkpoint = str(root / "pp2_dp2" / "checkpoints" / "step-00000010")
    four = run_on_ranks(4, run_many, [
        *[job(f"pp4_{s}", ["parallel.pp=4"], o, DEEP if s == "interleaved" else []) for s, o in SCHEDULES.items()],
        job("pp2_dp2", ["parallel.pp=2"]),
        job("pp2_tp2", ["parallel.pp=2", "parallel.tp=2"]),
        job("pp2_cp2", ["parallel.pp=2", "parallel.cp=2"]),
        job("pp2_dp2_zero1", ["parallel.pp=2", "parallel.zero=1"]),
        job("pp4_from_pp2_dp2", ["parallel.pp=4", f"checkpoint.resume={checkpoint}"]),
        job("dp4_from_pp2_dp2", [f"checkpoint.resume={checkpoint}"]),
    ])[0]
    two = run_on_ranks(2, run_many, [
        *[job(f"pp2_{s}", ["parallel.pp=2"], o) for s, o in SCHEDULES.items()],
        job("pp2_untied", ["parallel.pp=2"], UNTIED),
        job("pp2_uneven", ["parallel.pp=2", "parallel.pp_layers=[3,1]"]),
        job("pp2_zero2", ["parallel.pp=2", "parallel.zero=2"]),
    ])[0]
    one = run_on_ranks(1, run_many, [job("ref", []), job("ref_untied", UNTIED), job("ref_deep", DEEP)])[0]
    return {**four, **two, **one, "root": root}


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


REFERENCE = {"pp4_interleaved": "ref_deep", "pp2_untied": "ref_untied"}


@pytest.mark.parametrize("name", [
    *[f"pp{p}_{s}" for p in (2, 4) for s in SCHEDULES],
    "pp2_dp2", "pp2_tp2", "pp2_cp2", "pp2_dp2_zero1", "pp2_zero2", "pp2_untied", "pp2_uneven",
])
def test_pipeline_matches_single_process(runs, name):
    ref = runs[REFERENCE.get(name, "ref")]["losses"]
    got = runs[name]["losses"]
    assert len(ref) == 20 and ref[-1] < ref[0] - 0.5
    assert abs(got[0] - ref[0]) <= 1e-5
    assert max_difference(got, ref) <= 1e-3
    # Evaluation runs through the pipeline too.
    assert abs(runs[name]["val_loss"] - runs[REFERENCE.get(name, "ref")]["val_loss"]) <= 1e-3


def test_metrics_report_the_bubble(runs):
    rows = [json.loads(line) for line in (runs["root"] / "pp4_1f1b" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["pp_bubble"] < 1.0 for r in rows)
    assert all(r["activation_bytes"] is None for r in rows)


@pytest.mark.parametrize("name", ["pp4_from_pp2_dp2", "dp4_from_pp2_dp2"])
def test_checkpoint_moves_between_pipeline_and_other_layouts(runs, name):
    assert runs[name]["final_step"] == 20
    assert max_difference(runs[name]["losses"], runs["pp2_dp2"]["losses"][10:]) <= 1e-5


def tied_copies_after_training(rank: int, world: int, run_dir: str) -> list[float]:
    from pathlib import Path

    from plait.config import load_config
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer
    from scenarios import BASE

    # bf16 parameters with fp32 gradient reduction: the gradients take the copying path.
    cfg = load_config("tiny", BASE + SMALL + ["parallel.pp=2", "train.dtype=bf16", "parallel.reduce_dtype=fp32",
                                              "train.steps=3", "checkpoint.every=0"])
    trainer = Trainer(cfg, Path(run_dir), init_runtime(cfg))
    trainer.start()
    trainer.fit()
    weights = trainer.model.embed.weight.detach().float().flatten()[:64].tolist()
    trainer.close()
    return weights


def test_tied_embedding_copies_stay_identical(tmp_path):
    first, last = run_on_ranks(2, tied_copies_after_training, str(tmp_path / "run"))
    assert first == last
