"""The pipeline runtime on 2 and 4 gloo ranks against the dense single-process step.

One spawned group per world size runs every layout (schedule, v, tied or not, explicit split).
Each rank also runs the dense model over the same micro-batches (the full model is tiny), so it
compares its own stage's loss and gradients by parameter name against the dense ones; the test
checks that the ranks' parameter names together are exactly the dense model's.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from plait.config import ModelConfig
from plait.parallel.pipeline import PipelineRunner, StepStats, pp_bubble
from plait.parallel.pipeline_stage import StageModule
from plait.trace import TraceRecorder, trace_file_name

TOL = 1e-5
SEED = 7
BATCH, SEQ = 2, 16


def _cfg(n_layers: int, tied: bool) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=64,
                       seq_len=SEQ, tie_embeddings=tied)


def _data(m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, 64, (m, BATCH, SEQ + 1), generator=gen)
    return list(tokens[:, :, :-1]), list(tokens[:, :, 1:])


def _loss_fn(m: int):
    total_tokens = m * BATCH * SEQ

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / total_tokens
    return loss_fn


def _model(cfg: ModelConfig):
    from plait.model.init import init_parameters
    from plait.model.llama import Transformer

    model = Transformer(cfg)
    init_parameters(model, SEED, cfg)
    return model


def _dense(cfg: ModelConfig, m: int) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(cfg)
    inputs, targets = _data(m)
    loss_fn = _loss_fn(m)
    total = 0.0
    for x, y in zip(inputs, targets):
        loss = loss_fn(model(x), y)
        loss.backward()
        total += float(loss.detach())
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def pipeline_checks(rank: int, world: int, layouts: list[dict], trace_dir: str) -> list[dict]:
    """Run each layout's step; return per layout the loss and largest gradient differences."""
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group
    from plait.parallel.partition import partition_layers
    from plait.parallel.pipeline_stage import tied_embedding_group

    group, comm = Group("pp", list(range(world)), rank, dist.group.WORLD), Comm()
    tied_group = tied_embedding_group([list(range(world))], rank)
    results = []
    for layout in layouts:
        cfg = _cfg(layout["n_layers"], layout["tied"])
        m, v = layout["m"], layout["v"]
        dense_loss, dense_grads = _dense(cfg, m)
        stages = partition_layers(cfg.n_layers, world, v, explicit=layout.get("split"))
        stage = StageModule(_model(cfg), rank, world, stages)
        trace = TraceRecorder(rank, enabled=layout.get("trace", False))
        runner = PipelineRunner(stage, group, comm, layout["schedule"], m, v, (BATCH, SEQ, cfg.dim),
                                torch.float32, trace=trace)
        inputs, targets = _data(m)
        loss_fn = _loss_fn(m)
        out: dict = {"layout": layout, "names": sorted(n for n, _ in stage.named_parameters()),
                     "limit": runner.in_flight_limit, "peaks": [], "steps": []}
        for _ in range(layout.get("steps", 1)):
            stage.zero_grad(set_to_none=True)
            loss = runner.step(inputs if rank == 0 else None, targets if rank == world - 1 else None, loss_fn)
            stage.sync_tied_grads(comm, tied_group)
            grads = {n: p.grad for n, p in stage.named_parameters()}
            missing = [n for n, g in grads.items() if g is None]
            assert not missing, f"no gradient for {missing}"
            out["steps"].append({
                "loss_diff": abs(float(loss) - dense_loss) if rank == world - 1 else 0.0,
                "grad_diff": max(float((g - dense_grads[n]).abs().max()) for n, g in grads.items()),
            })
            out["peaks"].append(runner.last_stats.peak_in_flight)
            out["stats"] = runner.last_stats
        if trace.enabled:
            trace.write(Path(trace_dir) / trace_file_name(rank))
        results.append(out)
    return results


def _layouts(world: int) -> list[dict]:
    n_layers = 8 if world == 4 else 4
    layouts = []
    for schedule in ("gpipe", "1f1b", "zb"):
        for tied in (False, True):
            layouts.append(dict(schedule=schedule, v=1, m=4, tied=tied, n_layers=n_layers))
    layouts += [dict(schedule="interleaved", v=2, m=4, tied=tied, n_layers=n_layers) for tied in (False, True)]
    # Uneven explicit splits; the 1f1b one runs twice to check a runner is reusable step after step.
    uneven = [3, 1] if world == 2 else [1, 3, 2, 2]
    layouts.append(dict(schedule="1f1b", v=1, m=3, tied=True, n_layers=n_layers, split=uneven, steps=2))
    layouts.append(dict(schedule="zb", v=1, m=5, tied=False, n_layers=n_layers, split=uneven, trace=True))
    if world == 2:
        layouts.append(dict(schedule="interleaved", v=2, m=2, tied=True, n_layers=6, split=[2, 1, 1, 2]))
    return layouts


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_step_matches_dense(world, tmp_path):
    layouts = _layouts(world)
    started = time.monotonic()
    per_rank = run_on_ranks(world, pipeline_checks, layouts, str(tmp_path))
    elapsed = time.monotonic() - started
    for i, layout in enumerate(layouts):
        outs = [results[i] for results in per_rank]
        names = [n for out in outs for n in out["names"]]
        dense_names = sorted(n for n, _ in _model(_cfg(layout["n_layers"], layout["tied"])).named_parameters())
        # Every dense parameter on exactly one rank, except the tied embedding's two copies.
        expected = dense_names + (["embed.weight"] if layout["tied"] else [])
        assert sorted(names) == sorted(expected), layout
        for rank, out in enumerate(outs):
            for step in out["steps"]:
                assert step["loss_diff"] < TOL and step["grad_diff"] < TOL, (layout, rank, step)
            # Measured activations held never exceed what the schedule allows.
            assert max(out["peaks"]) <= out["limit"], (layout, rank, out["peaks"], out["limit"])
        if layout["schedule"] == "gpipe":
            assert all(out["peaks"] == [layout["m"]] for out in outs)  # gpipe holds every micro-batch
        assert 0.0 <= pp_bubble([out["stats"] for out in outs]) < 1.0
    print(f"pp={world}: {len(layouts)} layouts in {elapsed:.1f}s")

    traced = next(i for i, layout in enumerate(layouts) if layout.get("trace"))
    for rank in range(world):
        events = json.loads((tmp_path / trace_file_name(rank)).read_text())["traceEvents"]
        spans = [e for e in events if e["ph"] == "X"]
        kinds = {e["name"] for e in spans if e["cat"] == "compute"}
        assert kinds == {"F", "B", "W"}
        assert sum(e["name"] == "W" for e in spans) == layouts[traced]["m"]
        assert any(e["cat"] == "recv" for e in spans) and any(e["cat"] == "send" for e in spans)


def test_pp_bubble_averages_idle_fractions():
    stats = [StepStats(step_s=2.0, busy_s=1.5, peak_in_flight=1), StepStats(step_s=2.0, busy_s=1.0, peak_in_flight=1)]
    assert pp_bubble(stats) == pytest.approx((0.25 + 0.5) / 2)
    assert StepStats(step_s=0.0, busy_s=0.0, peak_in_flight=0).idle_fraction == 0.0


def test_stage_keeps_dense_names_and_drops_the_rest():
    cfg = _cfg(4, tied=True)
    stages = [[0], [1, 2], [3]]  # pp=3, v=1: the middle rank holds only its blocks
    middle = StageModule(_model(cfg), 1, 3, stages)
    assert sorted(n for n, _ in middle.named_parameters()) == sorted(
        n for n, _ in _model(cfg).named_parameters() if n.startswith(("blocks.1.", "blocks.2.")))
    last = StageModule(_model(cfg), 2, 3, stages)
    assert "embed.weight" in dict(last.named_parameters()) and "lm_head.weight" not in dict(last.named_parameters())
    assert last.lm_head.weight is last.embed.weight
    with pytest.raises(ValueError, match="cover blocks"):
        StageModule(_model(cfg), 0, 2, [[0, 1], [3]])


@pytest.mark.parametrize("schedule", ["gpipe", "zb"])
def test_single_stage_runner_is_the_dense_step(schedule):
    """pp = 1 needs no process group: the runner is plain gradient accumulation."""
    from plait.parallel.comm import Comm, Group

    cfg = _cfg(2, tied=True)
    dense_loss, dense_grads = _dense(cfg, 3)
    stage = StageModule(_model(cfg), 0, 1, [[0, 1]])
    runner = PipelineRunner(stage, Group.single("pp", 0), Comm(), schedule, 3, 1, (BATCH, SEQ, cfg.dim),
                            torch.float32)
    inputs, targets = _data(3)
    loss = runner.step(inputs, targets, _loss_fn(3))
    assert abs(float(loss) - dense_loss) < TOL
    for name, param in stage.named_parameters():
        assert float((param.grad - dense_grads[name]).abs().max()) < TOL, name
    assert runner.last_stats.peak_in_flight <= runner.in_flight_limit


def lost_peer_checks(rank: int, world: int, store_path: str) -> None:
    """The last rank dies in the middle of the second step; the others must fail fast, naming it.

    Rank 1 talks to the dead rank directly; rank 0 only sees rank 1 fail after it, and learns
    from the shared store which rank was lost first.
    """
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group
    from plait.parallel.partition import partition_layers

    process_group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=10))
    group, comm = Group("pp", list(range(world)), rank, process_group), Comm()
    store = dist.FileStore(store_path, world)
    cfg = _cfg(world, tied=False)
    stage = StageModule(_model(cfg), rank, world, partition_layers(world, world))
    runner = PipelineRunner(stage, group, comm, "1f1b", 4, 1, (BATCH, SEQ, cfg.dim), torch.float32, store=store)
    inputs, targets = _data(4)
    last = world - 1
    runner.step(inputs if rank == 0 else None, targets if rank == last else None, _loss_fn(4))
    if rank == last:
        forward = stage.forward_chunk
        calls = []

        def dying_forward(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(3)
            return forward(*args, **kwargs)
        stage.forward_chunk = dying_forward
    started = time.monotonic()
    try:
        runner.step(inputs if rank == 0 else None, targets if rank == last else None, _loss_fn(4))
    except RuntimeError as error:
        raise RuntimeError(f"after {time.monotonic() - started:.1f}s: {error}") from error
    raise AssertionError(f"the step finished although rank {last} died")


def test_lost_stage_fails_fast_naming_the_rank(tmp_path):
    # The dead rank never reports, so run_on_ranks gives up on it after timeout_s.
    with pytest.raises(AssertionError) as failure:
        run_on_ranks(3, lost_peer_checks, str(tmp_path / "lost-store"), timeout_s=10)
    text = str(failure.value)
    assert "ranks [2] returned nothing" in text
    for rank in (0, 1):
        lines = "\n".join(line for line in text.splitlines() if line.startswith(f"[rank {rank}]"))
        found = re.search(r"after ([0-9.]+)s: pipeline peer rank 2 is unreachable", lines)
        assert found, lines
        assert float(found.group(1)) < 12  # within the 10 s timeout (a closed connection fails at once)
