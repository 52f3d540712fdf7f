"""TensorBoard after a crash and a resume: one value per step, the same as metrics.jsonl's.

A one-process run checkpoints every 3 steps and crashes as step 5 begins; run again, it resumes
from step 3 and redoes steps 4 and 5. The redone steps must replace the first attempt's in
TensorBoard too (the resumed writer purges them), and every number of a metrics row must reach
TensorBoard under its key's tag.
"""

from __future__ import annotations

import pytest

from plait.train.metrics import TENSORBOARD_DIR, scalar_tags
from tests.scenarios import BASE, read_jsonl, train_cli

pytestmark = pytest.mark.timeout(180)

STEPS = 6


def test_scalar_tags_flatten_lists_and_skip_missing_values():
    row = {"step": 7, "loss": 2.5, "mfu": None, "tokens": 4096, "moe_imbalance": [1.5, None],
           "moe_load": [[3, 4], [5, 6]], "note": "text"}
    assert dict(scalar_tags(row)) == {
        "loss": 2.5, "tokens": 4096, "moe_imbalance/layer0": 1.5,
        "moe_load/layer0/expert0": 3, "moe_load/layer0/expert1": 4,
        "moe_load/layer1/expert0": 5, "moe_load/layer1/expert1": 6,
    }


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run = tmp_path / "run"
    overrides = BASE + [f"train.steps={STEPS}", "checkpoint.every=3", "log.tensorboard=true",
                        "resilience.mode=none", "fault.inject=crash@rank=0,step=5"]
    crashed = train_cli(run, overrides, nproc=1, timeout=120)
    assert crashed.returncode != 0, "the injected crash did not happen"
    first_dir = run / TENSORBOARD_DIR
    assert len(list(first_dir.glob("events.out.tfevents.*"))) == 1
    resumed = train_cli(run, overrides, nproc=1, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(first_dir.glob("events.out.tfevents.*"))) == 2  # the first attempt's file is still there

    rows = {row["step"]: row for row in read_jsonl(run / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, STEPS + 1))
    accumulator = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])

    for step, row in rows.items():
        numeric = {key for key, value in row.items()
                   if key != "step" and value is not None and not isinstance(value, str)}
        assert numeric <= {tag.split("/")[0] for tag in tags}, (step, numeric)
        for tag, _ in scalar_tags(row):
            assert tag in tags, (step, tag)
    expected = {step: dict(scalar_tags(row)) for step, row in rows.items()}
    assert [e.step for e in accumulator.Scalars("loss")] == list(range(1, STEPS + 1))
    for tag in sorted(tags):
        events = accumulator.Scalars(tag)
        # Most tags have every step; val_loss only the steps that evaluated.
        assert [e.step for e in events] == [step for step in sorted(rows) if tag in expected[step]], tag
        for event in events:
            assert event.value == pytest.approx(expected[event.step][tag], rel=1e-6), (tag, event.step)
