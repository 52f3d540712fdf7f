"""`plait plan` against plait's own runs: predicted state, communication and activation bytes
of every layout plait runs (data parallel, ZeRO 1-3, tensor +/- sequence, context and pipeline
parallel, and a combination) agree with what the trainer measured in metrics.jsonl."""

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

# (world size, overrides) of the parallel layouts, on the tiny model (tied embeddings, GQA).
LAYOUTS = {
    "zero1": (2, ["parallel.zero=1"]),
    "zero2": (2, ["parallel.zero=2"]),
    "zero3": (2, ["parallel.zero=3"]),
    "tp2_sp": (2, ["parallel.tp=2"]),
    "tp2_nosp": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "cp2": (2, ["parallel.cp=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "dp2_tp2_zero1": (4, ["parallel.tp=2", "parallel.zero=1"]),
}


def _jobs(root, world: int) -> list[tuple[str, list[str], str]]:
    jobs = [(f"{name}_dp{world}", overrides, str(root / f"{name}_dp{world}")) for name, overrides in SHAPES.items()]
    jobs += [(name, overrides, str(root / name)) for name, (w, overrides) in LAYOUTS.items() if w == world]
    return [(name, overrides + ["train.steps=3"], run_dir) for name, overrides, run_dir in jobs]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One spawned group per world size runs all of its jobs (3 steps each)."""
    root = tmp_path_factory.mktemp("plan_runs")
    out = {}
    for world in (2, 4):
        jobs = _jobs(root, world)
        run_on_ranks(world, run_many, jobs)
        for name, _, run_dir in jobs:
            rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            out[name] = (world, root / name, rows)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("world", [2, 4])
def test_predicted_state_and_comm_bytes_match_the_run(measured, shape, world):
    _, _, rows = measured[f"{shape}_dp{world}"]
    predicted = predict_run_metrics(load_config("tiny", BASE + SHAPES[shape]), world)
    # The issue allows 10%; for plain data parallelism both sides are exact arithmetic, and 1%
    # still catches a forgotten untied LM head (6% of the untied model here).
    for key in ("state_bytes", "comm_bytes"):
        for row in rows:
            assert abs(predicted[key] - row[key]) <= 0.01 * row[key], (key, predicted[key], row[key])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predicted_bytes_match_parallel_runs(measured, layout):
    world, overrides = LAYOUTS[layout]
    _, _, rows = measured[layout]
    predicted = predict_run_metrics(load_config("tiny", BASE + overrides), world)
    # The final step is left out: it also evaluates, which is not a training step's traffic.
    # State and traffic are modelled collective by collective and agree to the byte today; 1%
    # would still flag a lost collective (one norm all-reduce is ~0.1%, a regather ~4% under
    # tp). Activations are the planner's per-tensor count, allowed the 10%.
    for row in rows[:-1]:
        for key, tolerance in (("state_bytes", 0.01), ("comm_bytes", 0.01), ("activation_bytes", 0.10)):
            if predicted[key] is None:  # pipelines: the trainer does not measure activations
                assert row[key] is None, (key, row[key])
                continue
            assert abs(predicted[key] - row[key]) <= tolerance * row[key], (layout, key, predicted[key], row[key])


def test_calibrate_reads_real_run_directories(measured, capsys):
    dirs = [str(run_dir) for name, (_, run_dir, _) in measured.items() if name not in LAYOUTS]
    assert cli.main(["--calibrate", *dirs]) == 0
    report = capsys.readouterr().out
    for d in dirs:
        assert d.rsplit("/", 1)[-1] in report
