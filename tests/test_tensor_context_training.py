"""Tensor, sequence and context parallelism in the trainer, alone, combined with each other and
with data parallelism and ZeRO: the same losses as the single-process run, activation memory
that falls as Korthikanti et al. predict, and checkpoints that move between these layouts."""

from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from scenarios import run_many

pytestmark = pytest.mark.timeout(900)

# GQA with 8 query and 4 key/value heads, so tp can be 2 or 4; a global batch of 8 keeps the
# 4-rank runs short. Every run below, the reference included, uses this model.
MODEL = ["model.n_heads=8", "model.n_kv_heads=4", "train.global_batch=8", "train.micro_batch=4"]
ODD_VOCAB = ["model.vocab_size=257"]  # not divisible by tp: padded, and the padding must not count

LAYOUTS_4 = {
    "tp4": ["parallel.tp=4"],
    "cp4": ["parallel.cp=4"],
    "tp2_cp2": ["parallel.tp=2", "parallel.cp=2"],
    "dp2_tp2": ["parallel.tp=2"],
    "dp2_cp2": ["parallel.cp=2"],
}
LAYOUTS_2 = {"tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2"]}


def jobs(root, layouts: dict[str, list[str]]) -> list[tuple[str, list[str], str]]:
    out = []
    for name, overrides in layouts.items():
        # ZeRO 0 and 3 (sharded parameters gathered inside tp/cp): ZeRO-1 and -2 shard only
        # optimizer state and gradients, which tp and cp never touch (tests/test_zero.py).
        for zero in (0, 3):
            run = f"{name}_z{zero}"
            out.append((run, MODEL + overrides + [f"parallel.zero={zero}"], str(root / run)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_cp")
    checkpoint = str(root / "tp2_cp2_z0" / "checkpoints" / "step-00000010")
    four = run_on_ranks(4, run_many, jobs(root, LAYOUTS_4) + [
        ("tp4_from_tp2_cp2", MODEL + ["parallel.tp=4", f"checkpoint.resume={checkpoint}"], str(root / "r_tp4")),
        ("dp4_from_tp2_cp2", MODEL + ["train.micro_batch=2", f"checkpoint.resume={checkpoint}"], str(root / "r_dp4")),
    ])[0]
    two = run_on_ranks(2, run_many, jobs(root, LAYOUTS_2) + [
        ("tp2_odd_vocab", MODEL + ODD_VOCAB + ["parallel.tp=2"], str(root / "tp2_odd_vocab")),
        ("tp2_no_sp", MODEL + ["parallel.tp=2", "parallel.sequence_parallel=false", "train.steps=2"],
         str(root / "tp2_no_sp")),
    ])[0]
    one = run_on_ranks(1, run_many, [
        ("ref", MODEL, str(root / "ref")),
        ("ref_odd_vocab", MODEL + ODD_VOCAB, str(root / "ref_odd_vocab")),
        ("ref_selective", MODEL + ["train.recompute=selective", "train.steps=2"], str(root / "ref_selective")),
        ("ref_full", MODEL + ["train.recompute=full", "train.steps=2"], str(root / "ref_full")),
    ])[0]
    return {**four, **two, **one, "root": root}


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def first_row(runs, name: str) -> dict:
    return json.loads((runs["root"] / name / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("zero", [0, 3])
@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_layout_matches_single_process(runs, layout, zero):
    ref = runs["ref"]["losses"]
    got = runs[f"{layout}_z{zero}"]["losses"]
    assert len(ref) == 20 and ref[-1] < ref[0] - 0.5
    assert abs(got[0] - ref[0]) <= 1e-5
    assert max_difference(got, ref) <= 1e-3


def test_vocabulary_not_divisible_by_tp(runs):
    assert max_difference(runs["tp2_odd_vocab"]["losses"], runs["ref_odd_vocab"]["losses"]) <= 1e-3


@pytest.mark.parametrize("name", ["tp4_from_tp2_cp2", "dp4_from_tp2_cp2"])
def test_checkpoint_moves_between_layouts(runs, name):
    assert runs[name]["final_step"] == 20
    assert max_difference(runs[name]["losses"], runs["tp2_cp2_z0"]["losses"][10:]) <= 1e-5


def test_activation_bytes_fall_as_korthikanti_predicts(runs):
    """Measured from the first micro-batch of the first step (same micro-batch everywhere).
    The exact accounting of full recomputation (L x b x s x h per layer) is in test_recompute.py."""
    none = first_row(runs, "ref")["activation_bytes"]
    # tp = 2 with sequence parallelism: every saved tensor is split in two (Korthikanti: 1/t).
    tp2_sp = first_row(runs, "tp2_z0")["activation_bytes"]
    assert abs(tp2_sp / none - 0.5) <= 0.05, tp2_sp / none
    # Without sequence parallelism the norms and residuals stay whole (10 s b h of 34/t don't split).
    assert first_row(runs, "tp2_no_sp")["activation_bytes"] > 1.15 * tp2_sp
    # Recomputation: selective drops what the attention core saves, full keeps only block inputs.
    selective = first_row(runs, "ref_selective")["activation_bytes"]
    full = first_row(runs, "ref_full")["activation_bytes"]
    assert full < 0.5 * none and full < selective < none
