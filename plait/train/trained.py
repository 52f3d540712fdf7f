"""Load a finished (or running) run's newest valid checkpoint for inference or export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from plait import config as config_mod
from plait.data import Tokenizer, tokenizer_from_json
from plait.errors import CheckpointError
from plait.model import build_model
from plait.train import checkpoint as ckpt


@dataclass
class Trained:
    model: nn.Module
    cfg: config_mod.Config
    tokenizer: Tokenizer
    step: int
    path: Path


def load_trained(run_dir: Path) -> Trained:
    if not run_dir.exists():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    root = run_dir / "checkpoints"
    path, rejected = ckpt.newest_valid(root)
    if path is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in rejected) or "none found"
        raise CheckpointError(f"no valid checkpoint in {root} ({detail})")
    cfg = config_mod.load_config(str(path / "config.toml"))
    model = build_model(cfg.model, cfg.train.seed)
    weights = ckpt.read_file(path, "model.pt")
    missing = set(dict(model.named_parameters())) ^ set(weights)
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match its config: {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text())
    step = ckpt.read_file(path, "trainer.json")["step"]
    return Trained(model=model, cfg=cfg, tokenizer=tokenizer, step=step, path=path)
