"""Load a finished (or running) run's newest usable checkpoint for inference or export.

A checkpoint is used only if its files match their manifest and each one decodes: the model
through torch's safe loader (`weights_only=True`), which refuses anything but tensors and
plain containers. A checkpoint that fails is skipped for the next older one, and the caller
is told which and why (`Trained.rejected`, `report_choice`), never silently.

Both checkpoint formats load (train/checkpoint.py): v1's `model.pt` whole, as written; a
sharded (DCP) checkpoint one parameter at a time (train/sharded.py), so that memory holds the
model and one tensor being read, never a second copy of all the weights. For a sharded
checkpoint, `load_trained(..., weights=False)` reads no weights at all: its `.metadata` is
checked against the config (names and shapes) and `Trained.parameter` reads each tensor when it
is asked for, which is how `plait export` streams a model bigger than it could hold twice.
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
from plait.model.llama import Transformer
from plait.parallel.pieces import MODEL
from plait.train import checkpoint as ckpt
from plait.train.sharded import METADATA_FILE, read_tensor, stored_tensors


@dataclass
class Trained:
    model: nn.Module
    cfg: config_mod.Config
    tokenizer: Tokenizer
    step: int
    path: Path
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints skipped, and why
    # A sharded checkpoint's stored parameters (`model/<name>` -> DCP's entry); empty for v1.
    stored: dict[str, Any] = field(default_factory=dict, repr=False)

    def parameter(self, name: str) -> torch.Tensor:
        """Parameter `name` in full: the model's own tensor, or, when the model was loaded
        without weights (on the meta device), read from the sharded checkpoint now."""
        param = self.model.get_parameter(name)
        if not param.is_meta:
            return param.detach()
        try:
            return read_tensor(self.path, f"{MODEL}/{name}", self.stored[f"{MODEL}/{name}"])
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {self.path}: {exc}") from None


class _Unusable(Exception):
    """Why one checkpoint cannot be used; the caller moves on to the next older one."""


def load_trained(run_dir: Path, weights: bool = True) -> Trained:
    """The newest checkpoint of `run_dir` that verifies and loads; CheckpointError if there is none.

    `weights=False`: a sharded checkpoint's model stays on the meta device (names and shapes,
    checked against the checkpoint) and `Trained.parameter` reads each tensor on demand. A v1
    checkpoint is loaded whole either way: its one model.pt must be read to know it decodes."""
    if not run_dir.exists():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    root = run_dir / "checkpoints"
    rejected: list[tuple[Path, str]] = []
    for path in ckpt.list_checkpoints(root):
        try:
            trained = _load_checkpoint(path, weights)
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


def _load_checkpoint(path: Path, weights: bool) -> Trained:
    problem = ckpt.problem_with(path)
    if problem:
        raise _Unusable(problem)
    cfg = _decode(path, "config.toml", lambda file: config_mod.load_config(str(file)))
    tokenizer = _decode(path, "tokenizer.json", lambda file: tokenizer_from_json(file.read_text()))
    step = _decode(path, "trainer.json", lambda file: int(json.loads(file.read_text())["step"]))
    if _is_sharded(path):
        model, stored = _load_sharded(path, cfg, weights)
    else:
        model, stored = _load_v1(path, cfg), {}
    return Trained(model=model, cfg=cfg, tokenizer=tokenizer, step=step, path=path, stored=stored)


def _is_sharded(path: Path) -> bool:
    """Whether the (verified) manifest says the checkpoint is sharded: the manifest, not the files
    present, decides which files a checkpoint must have."""
    return json.loads((path / ckpt.MANIFEST).read_text()).get("format") == ckpt.SHARDED_FORMAT


def _load_v1(path: Path, cfg: config_mod.Config) -> nn.Module:
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
    return model


def _load_sharded(path: Path, cfg: config_mod.Config, weights: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a sharded checkpoint, filled one parameter at a time (or left on the meta
    device without `weights`), and its stored `model/*` entries. The optimizer's tensors are
    never read."""
    if not (path / METADATA_FILE).is_file():  # the manifest checks only what it lists
        raise _Unusable(f"{METADATA_FILE} is missing")
    try:
        stored = stored_tensors(path)  # its message names .metadata and what is wrong with it
    except CheckpointError as exc:
        raise _Unusable(str(exc)) from exc
    prefix = f"{MODEL}/"
    stored = {k: v for k, v in stored.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = Transformer(cfg.model)
    shapes = {prefix + n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied weight once
    mismatched = set(shapes) ^ set(stored)
    if mismatched:
        names = sorted(k.removeprefix(prefix) for k in mismatched)[:3]
        raise _Unusable(f"{METADATA_FILE} does not match its config.toml: {names}")
    for key, shape in shapes.items():
        if tuple(stored[key].size) != shape:
            raise _Unusable(f"{METADATA_FILE} does not match its config.toml: {key.removeprefix(prefix)} "
                            f"has shape {list(stored[key].size)}, config.toml builds {list(shape)}")
    if weights:
        # Materialised without initialising: every value is about to be read.
        model = model.to_empty(device="cpu")
        if cfg.model.tie_embeddings:  # to_empty re-creates parameters, so the tie must be re-made
            model.lm_head.weight = model.embed.weight
        with torch.no_grad():
            for name, param in model.named_parameters():
                key = prefix + name
                try:
                    tensor = read_tensor(path, key, stored[key])
                except CheckpointError as exc:
                    raise _Unusable(str(exc)) from exc
                param.copy_(tensor)
                del tensor  # before the next one is read: one tensor beside the model at a time
    return model, stored


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
