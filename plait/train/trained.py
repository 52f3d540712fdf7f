"""Load a finished (or running) run's newest usable checkpoint for inference or export.

A checkpoint is used only if its files match their manifest and each one decodes: the model
through torch's safe loader (`weights_only=True`), which refuses anything but tensors and
plain containers. A checkpoint that fails is skipped for the next older one, and the caller
is told which and why (`Trained.rejected`, `report_choice`), never silently.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from plait import config as config_mod
from plait.data import Tokenizer, tokenizer_from_json
from plait.errors import CheckpointError, PlaitError
from plait.model import build_model
from plait.train import checkpoint as ckpt


@dataclass
class Trained:
    model: nn.Module
    cfg: config_mod.Config
    tokenizer: Tokenizer
    step: int
    path: Path
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints skipped, and why


class _Unusable(Exception):
    """Why one checkpoint cannot be used; the caller moves on to the next older one."""


def load_trained(run_dir: Path) -> Trained:
    """The newest checkpoint of `run_dir` that verifies and loads; CheckpointError if there is none."""
    if not run_dir.exists():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    root = run_dir / "checkpoints"
    rejected: list[tuple[Path, str]] = []
    for path in ckpt.list_checkpoints(root):
        try:
            trained = _load_checkpoint(path)
        except _Unusable as exc:
            rejected.append((path, str(exc)))
            continue
        trained.rejected = rejected
        return trained
    detail = "; ".join(f"{p.name}: {why}" for p, why in rejected) or "none found"
    raise CheckpointError(f"no valid checkpoint in {root} ({detail})")


def report_choice(trained: Trained, stream: TextIO | None = None) -> None:
    """Say on `stream` (default: stderr) which checkpoint is used and why each newer one was not."""
    stream = stream or sys.stderr  # looked up now, not at import: callers and tests may swap it
    for path, why in trained.rejected:
        print(f"plait: warning: checkpoint {path} is unusable ({why}); using {trained.path}", file=stream)
    print(f"plait: using checkpoint {trained.path} (step {trained.step})", file=stream, flush=True)


def _load_checkpoint(path: Path) -> Trained:
    problem = ckpt.problem_with(path)
    if problem:
        raise _Unusable(problem)
    cfg = _decode(path, "config.toml", lambda file: config_mod.load_config(str(file)))
    tokenizer = _decode(path, "tokenizer.json", lambda file: tokenizer_from_json(file.read_text()))
    step = _decode(path, "trainer.json", lambda file: int(json.loads(file.read_text())["step"]))
    weights = _decode(path, "model.pt", lambda file: ckpt.read_file(path, file.name),  # weights_only=True
                      failure="fails torch's safe load")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise _Unusable("model.pt does not hold a dictionary of tensors")
    model = build_model(cfg.model, cfg.train.seed)
    mismatched = set(dict(model.named_parameters())) ^ set(weights)
    if mismatched:
        raise _Unusable(f"model.pt does not match its config.toml: {sorted(map(str, mismatched))[:3]}")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor's shape differs from what config.toml builds
        raise _Unusable(f"model.pt does not match its config.toml: {_first_line(exc)}") from exc
    return Trained(model=model, cfg=cfg, tokenizer=tokenizer, step=step, path=path)


def _decode(path: Path, name: str, read: Callable[[Path], Any], failure: str = "does not decode") -> Any:
    """`read(path / name)`, or _Unusable naming the file when its content does not decode."""
    file = path / name
    if not file.is_file():  # the manifest checks only what it lists
        raise _Unusable(f"{name} is missing")
    try:
        return read(file)
    except OSError:
        raise  # the machine (permission denied, I/O error), not the checkpoint: the CLI says so, exit 1
    except PlaitError as exc:
        raise _Unusable(f"{name}: {exc}") from exc
    except Exception as exc:
        # A damaged or hostile file fails in many ways (UnpicklingError, KeyError, EOFError,
        # UnicodeDecodeError...). torch's own message even suggests weights_only=False, which is
        # exactly what must not be done with a file of unknown origin, so it is not repeated.
        raise _Unusable(f"{name} {failure}: {type(exc).__name__}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
