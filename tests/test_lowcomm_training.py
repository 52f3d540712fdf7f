"""Low-communication training through the trainer (train.sync, parallel.grad_compression,
optim.name) on 4 gloo processes and on 1: reductions to known cases, exact resume of the
per-worker state, and the traffic each mode reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributed import run_on_ranks
from scenarios import run_many, train_cli

# The reductions hold for any model and at every step: a smaller model and 12 steps suffice.
SMALL = ["model.n_layers=2", "train.steps=12", "checkpoint.every=0"]
SGD = ["optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.grad_clip=0"]
OUTER_SGD = ["sync.outer_lr=1", "sync.outer_momentum=0"]
NOLOCO_AS_DILOCO = ["sync.inner_steps=5", "sync.outer_lr=0.6", "sync.outer_momentum=0.5"]
# Resume checks: 12 steps straight against 7 steps, then a second run continuing to 12.
FIRST = ["train.steps=7"]
CO2 = ["train.sync=co2", "sync.inner_steps=5", "sync.clip=5"]
GALORE = ["optim.name=galore", "optim.rank=8", "optim.update_proj_gap=5"]
POWERSGD = ["parallel.grad_compression=powersgd", "compression.rank=2", "compression.warmup_steps=2"]


def four_worker_jobs(root: Path) -> list[tuple[str, list[str], str]]:
    jobs = {
        "every_step_sgd": SGD,
        "diloco_h1": SGD + ["train.sync=diloco", "sync.inner_steps=1"] + OUTER_SGD,
        # Workers of 2 ranks: tp, pp and cp (with ZeRO-1 inside the worker) stay inside them.
        "diloco_h1_tp2": SGD + ["train.sync=diloco", "sync.inner_steps=1", "parallel.tp=2"] + OUTER_SGD,
        "diloco_h1_pp2": SGD + ["train.sync=diloco", "sync.inner_steps=1", "parallel.pp=2"] + OUTER_SGD,
        "diloco_h1_cp2_zero1": SGD + ["train.sync=diloco", "sync.inner_steps=1", "parallel.cp=2",
                                      "parallel.zero=1"] + OUTER_SGD,
        "diloco_plain_momentum": ["train.sync=diloco", "sync.nesterov=false"] + NOLOCO_AS_DILOCO,
        "noloco_one_group": ["train.sync=noloco", "sync.group_size=4"] + NOLOCO_AS_DILOCO,
        "every_step": [],
        "co2": CO2,
        "co2_first": CO2 + FIRST,
        "co2_resumed": CO2,
        "powersgd": POWERSGD,
        "powersgd_first": POWERSGD + FIRST,
        "powersgd_resumed": POWERSGD,
        "adaptive": ["parallel.grad_compression=adaptive", "compression.rank=2", "compression.warmup_steps=2",
                     "compression.adjust_every=5"],
        "galore": GALORE,
    }
    dirs = {name: name for name in jobs}
    dirs["co2_resumed"], dirs["powersgd_resumed"] = "co2_first", "powersgd_first"
    return [(name, SMALL + overrides, str(root / dirs[name])) for name, overrides in jobs.items()]


def one_worker_jobs(root: Path) -> list[tuple[str, list[str], str]]:
    jobs = {
        "plain": [],
        "diloco_one_worker": ["train.sync=diloco", "sync.inner_steps=5"] + OUTER_SGD,
        "galore": GALORE,
        "galore_first": GALORE + FIRST,
        "galore_resumed": GALORE,
    }
    dirs = {name: name for name in jobs}
    dirs["galore_resumed"] = "galore_first"
    return [(name, SMALL + overrides, str(root / dirs[name])) for name, overrides in jobs.items()]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowcomm4")
    return run_on_ranks(4, run_many, four_worker_jobs(root))[0], root


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowcomm1")
    return run_on_ranks(1, run_many, one_worker_jobs(root))[0]


def max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b))


def comm_bytes(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(row["comm_bytes"] for row in rows)


def test_diloco_with_one_inner_step_and_outer_sgd_is_every_step_data_parallel(four):
    results, _ = four
    assert max_gap(results["diloco_h1"]["losses"], results["every_step_sgd"]["losses"]) < 1e-6


@pytest.mark.parametrize("layout", ["tp2", "pp2", "cp2_zero1"])
def test_local_sync_leaves_parallelism_inside_a_worker_alone(four, layout):
    results, _ = four
    assert max_gap(results[f"diloco_h1_{layout}"]["losses"], results["every_step_sgd"]["losses"]) < 1e-5


def test_diloco_with_one_worker_is_plain_training(one):
    assert max_gap(one["diloco_one_worker"]["losses"], one["plain"]["losses"]) < 1e-6


def test_noloco_with_one_group_of_every_worker_is_the_diloco_step(four):
    results, _ = four
    assert max_gap(results["noloco_one_group"]["losses"], results["diloco_plain_momentum"]["losses"]) < 1e-6
    # ...and local steps do change the trajectory (the comparison above is not vacuous).
    assert max_gap(results["noloco_one_group"]["losses"], results["every_step"]["losses"]) > 1e-3


@pytest.mark.parametrize("method", ["co2", "powersgd"])
def test_per_worker_state_resumes_exactly(four, method):
    """CO2's average in flight and PowerSGD's residuals and warm starts survive a restart."""
    results, _ = four
    assert results[f"{method}_first"]["final_step"] == 7
    resumed = results[f"{method}_first"]["losses"] + results[f"{method}_resumed"]["losses"]
    assert max_gap(resumed, results[method]["losses"]) < 1e-6


def test_each_rank_writes_and_reads_only_its_own_state(four):
    """Per-worker state is one file per rank (no rank gathers the others'), with the layout
    beside it: a resume on another layout is refused with one line, exit status 2."""
    _, root = four
    run_dir = root / "co2_first"
    (newest,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    names = {p.name for p in newest.iterdir()}
    assert {f"local_state-rank{r:05d}.pt" for r in range(4)} <= names and "local_state.json" in names
    assert "local_state.pt" not in names
    assert json.loads((newest / "local_state.json").read_text())["world_size"] == 4
    result = train_cli(run_dir, SMALL + CO2 + ["train.steps=14"], nproc=1)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "resume it with the same layout" in result.stderr and "Traceback" not in result.stderr


def test_galore_state_resumes_exactly(one):
    """GaLore's projections and projected moments (not elementwise) go through the checkpoint."""
    resumed = one["galore_first"]["losses"] + one["galore_resumed"]["losses"]
    assert max_gap(resumed, one["galore"]["losses"]) < 1e-6


def test_galore_is_layout_invariant(four, one):
    results, _ = four
    assert max_gap(results["galore"]["losses"], one["galore"]["losses"]) < 1e-4


def test_traffic_per_mode(four):
    """DiLoCo at H = 5 sends one weight all-reduce per 5 steps; compression sends less than every_step."""
    _, root = four
    every_step = comm_bytes(root / "every_step")
    assert every_step > 0
    # Outer syncs after steps 5 and 10 of 12: 2 all-reduces of the weights against 12 of gradients.
    assert comm_bytes(root / "diloco_plain_momentum") / every_step == pytest.approx(2 / 12, rel=0.02)
    # 12 steps, of which the first 2 uncompressed (2/12 = 0.17 of every_step's bytes).
    assert comm_bytes(root / "adaptive") < 0.3 * every_step
    assert comm_bytes(root / "powersgd") < 0.3 * every_step


def test_compression_and_local_sync_learn(four):
    results, _ = four
    for name in ("diloco_plain_momentum", "adaptive", "galore", "co2"):
        losses = results[name]["losses"]
        assert losses[-1] < losses[0] - 0.15, (name, losses)


@pytest.mark.parametrize("overrides, message", [
    (["train.sync=diloco", "parallel.zero=3"], "train.sync=diloco with parallel.zero=3 is not supported"),
    (["train.sync=co2", "parallel.grad_compression=powersgd"], "only applies to train.sync=every_step"),
    (["train.sync=diloco", "sync.inner_steps=0"], "sync.inner_steps=0 must be at least 1"),
    (["train.sync=diloco", "sync.inner_steps=4", "sync.fragments=5"], "sync.fragments=5 must lie between 1"),
    (["parallel.grad_compression=adaptive", "parallel.zero=1"], "needs parallel.zero=0"),
    (["optim.name=galore", "parallel.zero=2"], "optim.name=galore needs whole matrices"),
    (["optim.name=sgd", "optim.momentum=1"], "optim.momentum=1.0 must lie in [0, 1)"),
    (["train.sync=sometimes"], "train.sync='sometimes' is not one of every_step, diloco, noloco, co2"),
])
def test_bad_low_communication_settings_name_the_field(overrides, message):
    from plait.config import load_config, validate
    from plait.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny", overrides), world_size=2)
    assert message in str(err.value) and "\n" not in str(err.value)
