"""`plait plan` against plait's own runs: predicted state and communication bytes of the
layouts plait can run today (data parallel) agree with what the trainer measured."""

from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from plait.config import load_config
from plait.plan import cli
from plait.plan.estimate import predict_run_metrics
from scenarios import BASE, run_many

pytestmark = pytest.mark.timeout(300)

SHAPES = {
    "tiny_tied": [],
    "untied_mha": ["model.dim=96", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=256",
                   "model.tie_embeddings=false", "model.n_layers=3"],
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_runs")
    out = {}
    for world in (2, 4):
        jobs = [(f"{name}_dp{world}", overrides + ["train.steps=3"], str(root / f"{name}_dp{world}"))
                for name, overrides in SHAPES.items()]
        run_on_ranks(world, run_many, jobs)
        for name, _, run_dir in jobs:
            out[name] = (world, root / name)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("world", [2, 4])
def test_predicted_state_and_comm_bytes_match_the_run(measured, shape, world):
    _, run_dir = measured[f"{shape}_dp{world}"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    predicted = predict_run_metrics(load_config("tiny", BASE + SHAPES[shape]), world)
    # The issue allows 10%; for plain data parallelism both sides are exact arithmetic, and 1%
    # still catches a forgotten untied LM head (6% of the untied model here).
    for key in ("state_bytes", "comm_bytes"):
        for row in rows:
            assert abs(predicted[key] - row[key]) <= 0.01 * row[key], (key, predicted[key], row[key])


def test_calibrate_reads_real_run_directories(measured, capsys):
    dirs = [str(run_dir) for _, run_dir in measured.values()]
    assert cli.main(["--calibrate", *dirs]) == 0
    report = capsys.readouterr().out
    for _, run_dir in measured.values():
        assert run_dir.name in report
