"""The foundation's promises, shown on gloo processes against the single-process run:
layout invariance (dp 1, 2, 4), gradient accumulation, exact resume on the same layout and
resume on a different process count.
"""

from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from scenarios import run_many

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    ref_step10 = str(root / "ref" / "checkpoints" / "step-00000010")
    one = run_on_ranks(1, run_many, [
        ("ref", [], str(root / "ref")),
        ("first_half", ["train.steps=10"], str(root / "resume")),
        ("second_half", [], str(root / "resume")),
        ("accum_2x4", ["train.global_batch=8", "train.micro_batch=2", "train.steps=5"], str(root / "acc2")),
        ("accum_8x1", ["train.global_batch=8", "train.micro_batch=8", "train.steps=5"], str(root / "acc8")),
    ])[0]
    # Small buckets, so the two-rank run overlaps many all-reduces with backward.
    two = run_on_ranks(2, run_many, [
        ("dp2", ["parallel.bucket_mb=0.05"], str(root / "dp2")),
        ("dp2_from_dp1", [f"checkpoint.resume={ref_step10}"], str(root / "dp2_resume")),
    ])[0]
    four = run_on_ranks(4, run_many, [
        ("dp4", [], str(root / "dp4")),
        ("dp4_from_dp1", [f"checkpoint.resume={ref_step10}"], str(root / "dp4_resume")),
    ])[0]
    return {**one, **two, **four, "root": root}


def assert_close(actual: list[float], expected: list[float], tol: float) -> None:
    assert len(actual) == len(expected)
    worst = max(abs(a - e) for a, e in zip(actual, expected))
    assert worst <= tol, f"largest loss difference {worst:.3g} > {tol:g}: {actual} vs {expected}"


@pytest.mark.parametrize("name", ["dp2", "dp4"])
def test_data_parallel_matches_single_process(runs, name):
    ref = runs["ref"]["losses"]
    got = runs[name]["losses"]
    assert len(ref) == 20
    assert abs(got[0] - ref[0]) <= 1e-5
    assert_close(got, ref, 1e-3)
    assert ref[-1] < ref[0] - 0.5  # it learned something, so the comparison means something


def test_gradient_accumulation_equals_large_micro_batch(runs):
    assert_close(runs["accum_2x4"]["losses"], runs["accum_8x1"]["losses"], 1e-5)


def test_resume_is_bitwise_on_the_same_layout(runs):
    ref = runs["ref"]
    assert runs["first_half"]["losses"] == ref["losses"][:10]
    assert runs["second_half"]["losses"] == ref["losses"][10:]
    assert runs["second_half"]["digest"] == ref["digest"]
    rows = [json.loads(line) for line in (runs["root"] / "resume" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # one history in one run directory
    assert [r["loss"] for r in rows] == ref["losses"]


@pytest.mark.parametrize("name", ["dp2_from_dp1", "dp4_from_dp1"])
def test_resume_on_another_process_count(runs, name):
    assert runs[name]["final_step"] == 20
    assert_close(runs[name]["losses"], runs["ref"]["losses"][10:], 1e-5)


def test_comm_bytes_is_the_ring_all_reduce_volume(runs):
    n_params = 820_352  # the tiny preset, tied embeddings counted once
    for name, world in (("ref", 1), ("dp2", 2), ("dp4", 4)):
        rows = [json.loads(line) for line in (runs["root"] / name / "metrics.jsonl").read_text().splitlines()]
        expected = 2 * (world - 1) / world * 4 * n_params
        assert {r["comm_bytes"] for r in rows} == {int(expected)}, name
        # fp32 AdamW: 4 (param) + 4 (grad) + 8 (two moments) bytes per parameter on every rank
        assert {r["state_bytes"] for r in rows} == {16 * n_params}, name
        assert all(r["mfu"] is None for r in rows)  # CPU: no known peak, never a guess
