"""One set of layout rules: `plait plan` and `plait train` accept and reject the same layouts.

The planner asks `plan.layouts.check_layout`; the trainer validates its config with
`config.validate`. Both must give the same answer (and the same reason) for every layout, so
a rule added to one side only fails here.
"""

import copy
import dataclasses
import functools
import random

import pytest
import torch

from plait.config import apply_override, load_config, validate
from plait.errors import ConfigError
from plait.layout import Layout
from plait.model import build_model, count_parameters
from plait.plan.layouts import check_layout, enumerate_layouts, parse_layout
from plait.plan.models import from_plait_model

GLOBAL_BATCH = 16
MODELS = {
    "tiny": [],
    "tiny_moe": ["model.n_experts=4", "model.top_k=2"],
    "one_kv_head": ["model.n_kv_heads=1", "model.n_layers=8", "model.seq_len=96"],
}


@functools.lru_cache(maxsize=None)
def base_config(model: str):
    return load_config("tiny", MODELS[model] + [f"train.global_batch={GLOBAL_BATCH}"])


def config_for(model: str, layout: Layout):
    cfg = copy.deepcopy(base_config(model))
    p = layout
    for item in [f"train.micro_batch={p.micro_batch}", f"train.recompute={p.recompute}",
                 f"parallel.tp={p.tp}", f"parallel.pp={p.pp}", f"parallel.dp={p.dp}", f"parallel.cp={p.cp}",
                 f"parallel.ep={p.ep}", f"parallel.zero={p.zero}", f"parallel.pp_schedule={p.schedule}",
                 f"parallel.pp_virtual_stages={p.virtual_stages}",
                 f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}"]:
        apply_override(cfg, item)
    return cfg


def runtime_answer(model: str, layout: Layout, world_size: int) -> str | None:
    try:
        validate(config_for(model, layout), world_size)
    except ConfigError as exc:
        return str(exc)
    return None


def sample_layouts(seed: int, count: int) -> list[tuple[Layout, int]]:
    """Layouts around the edges of the rules: degrees that do and do not divide the model and
    the world, every schedule, ZeRO stages, expert parallelism, mismatched world sizes."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        tp, pp, cp, dp = rng.choice([1, 1, 2, 4]), rng.choice([1, 1, 2, 4]), rng.choice([1, 1, 2]), rng.choice([1, 2])
        world = tp * pp * cp * dp * (1 if rng.random() < 0.9 else 2)
        schedule, virtual = rng.choice([("1f1b", 1), ("gpipe", 1), ("zb", 1), ("zb-h1", 1), ("interleaved", 2),
                                        ("interleaved", 1), ("1f1b", 2)])
        found.append((Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=rng.choice([1, 1, 2, 4]),
                             zero=rng.choice([0, 1, 2, 3]), micro_batch=rng.choice([1, 2, 3, 4]),
                             schedule=schedule, virtual_stages=virtual,
                             recompute=rng.choice(["none", "selective", "full"]),
                             sequence_parallel=rng.random() < 0.7), world))
    return found


@pytest.mark.parametrize("model", sorted(MODELS))
def test_planner_and_runtime_accept_and_reject_the_same_layouts(model):
    spec = from_plait_model(base_config(model).model, model)
    accepted = rejected = 0
    for layout, world in sample_layouts(seed=len(model), count=400):
        planner = check_layout(layout, spec, world, GLOBAL_BATCH)
        runtime = runtime_answer(model, layout, world)
        assert planner == runtime, (layout.short(), world)
        accepted += runtime is None
        rejected += runtime is not None
    # The sample covers both answers, so agreement means something.
    assert accepted >= 40 and rejected >= 100, (accepted, rejected)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_layout_the_planner_proposes_trains(model):
    spec = from_plait_model(base_config(model).model, model)
    for world in (4, 8):
        proposed = list(enumerate_layouts(spec, world, GLOBAL_BATCH, gpus_per_node=8))
        assert proposed
        for layout in proposed[::max(1, len(proposed) // 100)]:  # about 100 of each, spread over all
            assert runtime_answer(model, layout, world) is None, layout.short()


def test_one_spelling_per_schedule_and_the_old_one_is_an_alias():
    assert parse_layout("pp=2,schedule=zb-h1", 2).schedule == "zb"
    cfg = load_config("tiny", ["parallel.pp_schedule=zb-h1"])
    assert cfg.parallel.pp_schedule == "zb"
    spec = from_plait_model(cfg.model, "tiny")
    assert all(layout.schedule in ("1f1b", "gpipe", "zb", "interleaved")
               for layout in enumerate_layouts(spec, 4, GLOBAL_BATCH, gpus_per_node=8))


def test_the_planner_sees_a_plait_configs_experts():
    cfg = load_config("tiny", ["model.n_experts=8", "model.top_k=2", "model.moe_every=2",
                               "model.n_shared_experts=1", "model.moe_ffn_dim=64"])
    spec = from_plait_model(cfg.model, "moe")
    assert (spec.n_experts, spec.experts_per_token, spec.moe_every, spec.n_shared_experts,
            spec.expert_ffn_dim) == (8, 2, 2, 1, 64)
    dense = from_plait_model(load_config("tiny").model, "dense")
    # The planner counts what the trainer builds, experts, shared experts and dense layers included.
    for model_cfg, counted in ((cfg.model, spec), (load_config("tiny").model, dense)):
        assert counted.n_params() == count_parameters(build_model(model_cfg, 0, torch.device("cpu")))
    assert spec.active_params() < spec.n_params()
    # ep needs experts on both sides
    layout = dataclasses.replace(Layout(dp=2, ep=2))
    assert check_layout(layout, spec, 2, GLOBAL_BATCH) is None
    assert "need an MoE model" in check_layout(layout, dense, 2, GLOBAL_BATCH)
