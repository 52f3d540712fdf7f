"""Mixture of experts in the trainer: an MoE tiny (4 experts, top-2, fp32, 20 steps) gives the
single-process losses under expert parallelism folded into every layout (ep 2 on 2 ranks,
ep 4 on 4, ep 2 with expert-data-parallel 2 under ZeRO-1, ep 4 over cp 2 x dp 2, tp 2 with
etp 1 on 2 and on 4 ranks), drops the same tokens with a capacity factor, resumes across
layouts, and keeps the global-batch load-balancing loss independent of how the batch is cut
into micro-batches while the micro-batch scope depends on it (but not on cp). The layer-level
checks (the per-token loop, the balance losses' values, global-batch LBL over 2 ranks x 2
micro-batches, dispatch with all tokens to one expert or none to another) are in test_moe.py."""

from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from scenarios import run_many

pytestmark = pytest.mark.timeout(900)

TOL = 1e-3  # the bound on 20 fp32 steps; plait gets about 1e-6
# Small enough for 4 ranks on 2 cores; aux coefficients large enough that a wrong router
# gradient would show in the losses (checked by `no_aux` below).
MOE = ["model.n_layers=2", "model.n_experts=4", "model.top_k=2", "model.moe_ffn_dim=96",
       "model.n_shared_experts=1", "train.global_batch=8", "train.micro_batch=2",
       "train.lbl_coef=0.1", "train.z_loss_coef=0.01"]
CAPPED = ["model.capacity_factor=1.0"]
SCOPE_RUN = ["train.lbl_coef=1.0", "train.steps=6"]

LAYOUTS_2 = {"ep2": ["parallel.ep=2"], "tp2_etp1": ["parallel.tp=2"],
             "ep2_capped": ["parallel.ep=2"] + CAPPED,
             "ep2_zero2": ["parallel.ep=2", "parallel.zero=2"]}  # reduce-scatter per micro-batch
# Micro-batch scope counts f over the ranks sharing a micro-batch (here the cp pair), so it
# still matches one process cutting the batch into the same micro-batches.
MICRO_SCOPE_CP2 = ["parallel.cp=2", "parallel.ep=2", "train.lbl_scope=micro_batch", "train.micro_batch=2", *SCOPE_RUN]
LAYOUTS_4 = {
    "ep4": ["parallel.ep=4"],
    "ep4_cp2_dp2": ["parallel.ep=4", "parallel.cp=2"],
    "tp2_dp2_ep2": ["parallel.tp=2", "parallel.ep=2"],
    "ep2_edp2_zero1": ["parallel.ep=2", "parallel.zero=1"],  # ZeRO-1 shards the experts over edp 2
}


def jobs(root, layouts: dict[str, list[str]]) -> list[tuple[str, list[str], str]]:
    return [(name, MOE + overrides, str(root / name)) for name, overrides in layouts.items()]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    one = run_on_ranks(1, run_many, jobs(root, {
        "ref": [], "ref_capped": CAPPED, "no_aux": ["train.lbl_coef=0", "train.z_loss_coef=0"],
        # The same global batches cut into micro-batches of 2 or 4, under each scope, with a
        # large balance coefficient so that the scope shows within a few steps.
        **{f"{scope}_micro{micro}": [f"train.lbl_scope={scope}", f"train.micro_batch={micro}", *SCOPE_RUN]
           for scope in ("global_batch", "micro_batch") for micro in (2, 4)},
    }))[0]
    two = run_on_ranks(2, run_many, jobs(root, {**LAYOUTS_2, "micro_scope_cp2": MICRO_SCOPE_CP2}))[0]
    checkpoint = root / "ep2" / "checkpoints" / "step-00000010"
    sharded = root / "ep2_edp2_zero1" / "checkpoints" / "step-00000010"  # written after that run
    four = run_on_ranks(4, run_many, jobs(root, LAYOUTS_4) + [
        ("ep4_cp2_dp2_from_ep2", MOE + ["parallel.ep=4", "parallel.cp=2", f"checkpoint.resume={checkpoint}"],
         str(root / "resumed")),
        ("ep4_from_ep2_edp2_zero1", MOE + ["parallel.ep=4", f"checkpoint.resume={sharded}"],
         str(root / "resumed_from_zero1")),
    ])[0]
    return {**one, **two, **four, "root": root}


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_layout_matches_single_process(runs, layout):
    reference = "ref_capped" if layout.endswith("capped") else "ref"
    assert runs[layout]["final_step"] == 20
    delta = max_diff(runs[layout]["losses"], runs[reference]["losses"])
    print(f"{layout}: largest loss difference over 20 steps {delta:.2e}")
    assert delta < TOL, layout
    # The router statistics too: the global-batch balance loss and the load per expert.
    ours, ref = metrics(runs["root"] / layout), metrics(runs["root"] / reference)
    assert max_diff([r["moe_lbl"] for r in ours], [r["moe_lbl"] for r in ref]) < TOL
    assert [r["moe_load"] for r in ours] == [r["moe_load"] for r in ref]


def test_aux_losses_change_training(runs):
    """The aux coefficients are large enough that the comparisons above see the router's
    auxiliary gradients (a layout that lost them would fail)."""
    assert max_diff(runs["no_aux"]["losses"], runs["ref"]["losses"]) > 10 * TOL


def test_capacity_drops_the_same_tokens(runs):
    ours, ref = metrics(runs["root"] / "ep2_capped"), metrics(runs["root"] / "ref_capped")
    dropped = [r["moe_dropped_frac"] for r in ref]
    assert any(f > 0 for row in dropped for f in row)  # the cap really binds
    assert [r["moe_dropped_frac"] for r in ours] == dropped
    assert all(f == 0 for r in metrics(runs["root"] / "ref") for f in r["moe_dropped_frac"])


@pytest.mark.parametrize("resumed", ["ep4_cp2_dp2_from_ep2", "ep4_from_ep2_edp2_zero1"])
def test_checkpoint_resumes_in_another_layout(runs, resumed):
    """Experts gathered whole over ep (and, under ZeRO-1, over edp) and cut again."""
    resumed = runs[resumed]
    assert resumed["final_step"] == 20 and len(resumed["losses"]) == 10
    assert max_diff(resumed["losses"], runs["ref"]["losses"][10:]) < TOL


def test_lbl_scope_and_micro_batches(runs):
    """Global-batch scope does not depend on the micro-batch size; micro-batch scope does."""
    same = max_diff(runs["global_batch_micro4"]["losses"], runs["global_batch_micro2"]["losses"])
    differs = max_diff(runs["micro_batch_micro4"]["losses"], runs["micro_batch_micro2"]["losses"])
    print(f"global-batch scope, micro 2 vs 4: {same:.2e}; micro-batch scope: {differs:.2e}")
    assert same < TOL
    assert differs > TOL
    assert max_diff(runs["micro_scope_cp2"]["losses"], runs["micro_batch_micro2"]["losses"]) < TOL


def test_metrics_keys(runs):
    row = metrics(runs["root"] / "ref")[-1]
    assert len(row["moe_load"]) == 2 and all(len(layer) == 4 for layer in row["moe_load"])
    # Every token fills top_k slots: 8 sequences x 128 tokens x 2 per layer.
    assert all(sum(layer) == 8 * 128 * 2 for layer in row["moe_load"])
    assert all(imbalance >= 1.0 for imbalance in row["moe_imbalance"])
    assert 1.0 <= row["moe_lbl"] <= 4.0 and row["moe_z_loss"] > 0


@pytest.mark.parametrize("overrides, world, message", [
    (["model.n_experts=4", "parallel.ep=4"], 2, "parallel.ep=4 x etp=1 must divide tp x cp x dp = 2"),
    (["model.n_experts=6", "parallel.ep=4"], 4, "model.n_experts=6 is not divisible by parallel.ep=4"),
    (["model.n_experts=4", "parallel.etp=2"], 2, "parallel.etp=2 is not yet supported"),
    (["model.n_experts=4", "model.top_k=5"], 1, "model.top_k=5 must lie between 1 and model.n_experts=4"),
    (["model.n_experts=4", "model.capacity_factor=-1"], 1, "model.capacity_factor=-1.0 must not be negative"),
    (["model.n_experts=4", "parallel.tp=2", "parallel.sequence_parallel=false"], 2,
     "needs parallel.sequence_parallel=true"),
    (["model.n_experts=4", "parallel.zero=3"], 2, "parallel.zero=3 with model.n_experts > 0 is not yet supported"),
    (["model.n_experts=4", "parallel.pp=2"], 2, "parallel.pp > 1 with model.n_experts > 0 is not yet supported"),
])
def test_moe_config_errors(overrides, world, message):
    from plait import config as config_mod
    from plait.errors import ConfigError

    cfg = config_mod.load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_mod.validate(cfg, world)


def test_folded_groups():
    """ep taken out of dp x cp x tp: consecutive ranks of a stage form an ep group."""
    from plait.mesh import ParallelDims
    from plait.parallel.folding import folded_groups

    groups = folded_groups(ParallelDims(dp=2, cp=2), ep=4)
    assert groups["ep"] == [[0, 1, 2, 3]] and groups["edp"] == [[0], [1], [2], [3]]
    groups = folded_groups(ParallelDims(dp=4), ep=2)
    assert groups["ep"] == [[0, 1], [2, 3]] and groups["edp"] == [[0, 2], [1, 3]]
    groups = folded_groups(ParallelDims(dp=2, tp=2), ep=2)  # tensor-parallel peers share experts' tokens
    assert groups["ep"] == [[0, 1], [2, 3]] and groups["micro_batch"] == [[0, 1], [2, 3]]
    assert groups["tokens"] == [[0, 1, 2, 3]]
