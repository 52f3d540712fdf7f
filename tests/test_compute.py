"""The compute plan (plait/train/compute.py): its auto choices, and that every path it can take
trains the same model as the plain one, through the trainer."""

from __future__ import annotations

import pytest
import torch
from scenarios import run_training

from plait.config import load_config, validate
from plait.errors import ConfigError
from plait.train.compute import AUTO_BLOCKS_FROM_LAYERS, plan_compute

SHORT = ["train.steps=5", "checkpoint.every=0"]


def _plan(*overrides: str, device: str = "cpu"):
    return plan_compute(validate(load_config("tiny", list(overrides)), 1), torch.device(device))


def test_auto_choices_on_cpu_keep_the_reference_paths():
    plan = _plan()
    assert (plan.kernels, plan.compile_scope, plan.chunked_ce) == ("reference", None, False)
    assert _plan("train.compile=true").compile_scope == "model"  # tiny: fewer layers than the threshold
    deep = _plan("train.compile=true", f"model.n_layers={AUTO_BLOCKS_FROM_LAYERS}")
    assert deep.compile_scope == "blocks"
    assert _plan("train.compile=true", "train.compile_scope=model", f"model.n_layers={AUTO_BLOCKS_FROM_LAYERS}"
                 ).compile_scope == "model"
    assert _plan("train.chunked_ce=on", "train.ce_chunk_tokens=64").chunked_ce


def test_bad_compute_settings_are_named(monkeypatch):
    with pytest.raises(ConfigError, match="train.chunked_ce=on needs parallel.tp=1"):
        validate(load_config("tiny", ["train.chunked_ce=on", "parallel.tp=2"]), 2)
    with pytest.raises(ConfigError, match="train.ce_chunk_tokens=0"):
        validate(load_config("tiny", ["train.ce_chunk_tokens=0"]), 1)
    # The CPU without Triton's interpreter (the tests turn it on) cannot run the fused kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="train.kernels=fused needs Triton on a CUDA device"):
        _plan("train.kernels=fused")


def test_chunked_loss_trains_like_full_logits(tmp_path):
    full = run_training(SHORT + ["train.chunked_ce=off", "train.eval_every=3"], str(tmp_path / "full"))
    # 512 tokens per micro-batch in chunks of 100: the last chunk is short.
    chunked = run_training(SHORT + ["train.chunked_ce=on", "train.ce_chunk_tokens=100", "train.eval_every=3"],
                           str(tmp_path / "chunked"))
    assert len(chunked["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(full["losses"], chunked["losses"])) < 1e-5
    assert abs(full["val_loss"] - chunked["val_loss"]) < 1e-5  # evaluation goes through the chunked loss too


def test_compiled_scopes_train_like_eager(tmp_path):
    eager = run_training(SHORT, str(tmp_path / "eager"))
    # Each way of compiling: the model with its loss, the blocks with the head and loss
    # compiled apart, and the blocks before the (eager) chunked loss.
    compiled = SHORT + ["train.compile=true"]
    runs = {
        "model": run_training(compiled + ["train.compile_scope=model"], str(tmp_path / "model")),
        "blocks": run_training(compiled + ["train.compile_scope=blocks"], str(tmp_path / "blocks")),
        "blocks_chunked": run_training(compiled + ["train.compile_scope=blocks", "train.chunked_ce=on"],
                                       str(tmp_path / "blocks_chunked")),
    }
    for name, run in runs.items():
        assert max(abs(a - b) for a, b in zip(eager["losses"], run["losses"])) < 1e-4, name


def test_fused_kernels_are_installed_where_the_plan_says(tmp_path):
    """train.kernels=fused reaches every norm, MLP and attention the trainer runs (the kernels
    themselves are checked against their references in test_kernels.py); reference leaves them."""
    from scenarios import BASE

    from plait.kernels.rmsnorm import fused_rms_norm
    from plait.kernels.rotary import fused_apply_rotary
    from plait.kernels.swiglu import fused_swiglu
    from plait.model.llama import Attention, RMSNorm, SwiGLU
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    expected = {RMSNorm: ("norm", fused_rms_norm), SwiGLU: ("activation", fused_swiglu),
                Attention: ("rotary", fused_apply_rotary)}
    for kernels, fused in (("fused", True), ("reference", False)):
        cfg = load_config("tiny", BASE + [f"train.kernels={kernels}"])
        trainer = Trainer(cfg, tmp_path / kernels, init_runtime(cfg))
        try:
            assert trainer.compute.kernels == kernels
            seen = 0
            for module in trainer.model.modules():
                for kind, (attr, function) in expected.items():
                    if isinstance(module, kind):
                        assert (getattr(module, attr) is function) == fused, (kernels, type(module).__name__)
                        seen += 1
            assert seen == 4 * cfg.model.n_layers + 1  # two norms, an MLP, an attention per block; the final norm
        finally:
            trainer.close()
