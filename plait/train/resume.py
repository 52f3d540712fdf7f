"""What a run saves in a checkpoint, which checkpoint it resumes from, and how it restores.

The saved state is layout-independent: boxes of full tensors keyed by parameter name (model
and optimizer; each rank writes its own, see sharded.py), the step and token count (the sampler is a pure function of seed and step, so
the step is the data position), each rank's RNG state, the resolved config and the
tokenizer. Any process count can load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from plait import config as config_mod
from plait.errors import CheckpointError
from plait.train import checkpoint as ckpt
from plait.train.sharded import is_sharded


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0


def checkpoint_files(
    params: dict[str, torch.Tensor], optimizer: dict[str, dict[str, torch.Tensor]], state: TrainState,
    cfg: config_mod.Config, rng_states: list[torch.Tensor], tokenizer_json: str, layout: str,
) -> dict[str, Any]:
    """The files of a whole-state (v1) checkpoint: the model and optimizer in full, and the rest."""
    return {"model.pt": params, "optimizer.pt": optimizer,
            **small_files(state, cfg, rng_states, tokenizer_json, layout)}


def small_files(state: TrainState, cfg: config_mod.Config, rng_states: list[torch.Tensor], tokenizer_json: str,
                layout: str) -> dict[str, Any]:
    """Everything but the model and optimizer: what rank 0 adds to a sharded checkpoint."""
    return {
        "rng.pt": {"torch_cpu": rng_states},
        "trainer.json": {
            "step": state.step, "tokens": state.tokens, "seed": cfg.train.seed,
            "global_batch": cfg.train.global_batch, "seq_len": cfg.model.seq_len,
            "corpus": cfg.data.corpus, "layout": layout,
        },
        "config.toml": config_mod.to_toml(cfg),
        "tokenizer.json": tokenizer_json,
    }


def choose_checkpoint(cfg: config_mod.Config, run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint this run resumes from (None: a fresh start) and any corrupt ones skipped.

    Raises CheckpointError rather than start fresh when checkpoints exist but none is valid.
    """
    resume = cfg.checkpoint.resume
    if resume == "never":
        if ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise CheckpointError(
                f"checkpoint.resume=never but {run_dir} already holds checkpoints; "
                "use another --run-dir or checkpoint.resume=auto"
            )
        return None, []
    if resume == "auto":
        root = run_dir / "checkpoints"
    else:
        given = Path(resume)
        if not given.exists():
            raise CheckpointError(f"checkpoint.resume: '{resume}' does not exist")
        if (given / ckpt.MANIFEST).exists() or ckpt.STEP_DIR.match(given.name):
            reason = ckpt.problem_with(given)
            if reason:
                raise CheckpointError(f"checkpoint.resume: '{resume}' is not usable: {reason}")
            return given, []
        root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    found, rejected = ckpt.newest_valid(root)
    if found is None and rejected:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in rejected)
        raise CheckpointError(f"no valid checkpoint in {root} ({reasons}); refusing to start from scratch")
    if found is None and resume not in ("auto", "never"):
        raise CheckpointError(f"checkpoint.resume: no checkpoint found in '{resume}'")
    return found, rejected


def check_compatible(path: Path, cfg: config_mod.Config, tokenizer_json: str | None = None) -> list[str]:
    """Raise if the checkpoint's model or tokenizer differs from this run's; return warnings for
    softer changes. `tokenizer_json` is this run's tokenizer (None: judge by the config alone).

    A new tokenizer gives the saved embeddings other meanings, so it is refused unless
    checkpoint.reset_data says the user wants to go on with the new data anyway."""
    saved = config_mod.load_config(str(path / "config.toml"))
    for field, value in config_mod.to_dict(saved)["model"].items():
        current = getattr(cfg.model, field)
        if value != current:
            raise CheckpointError(
                f"checkpoint {path} was written for model.{field}={value}, this run has model.{field}={current}"
            )
    warnings = []
    changes = {dotted: (old, new) for dotted in ("train.seed", "train.global_batch", "data.corpus", "data.tokenizer")
               if (old := _get(saved, dotted)) != (new := _get(cfg, dotted))}
    if "data.tokenizer" in changes or not _same_tokenizer(path, tokenizer_json):
        what = ", ".join(f"{d} {changes[d][0]!r} -> {changes[d][1]!r}" for d in ("data.tokenizer", "data.corpus")
                         if d in changes) or f"data.tokenizer {cfg.data.tokenizer!r} built anew from data.corpus"
        if not cfg.checkpoint.reset_data:
            raise CheckpointError(
                f"checkpoint {path} was trained with another tokenizer ({what}): its token ids would mean other "
                "text; set checkpoint.reset_data=true to continue with the new tokenizer anyway"
            )
        warnings.append(f"the tokenizer changed since the checkpoint ({what}); continuing with the new one "
                        "as checkpoint.reset_data=true asks")
    for dotted, (old, new) in changes.items():
        if dotted != "data.tokenizer":
            warnings.append(f"{dotted} changed from {old!r} to {new!r} since the checkpoint: the sample order differs")
    return warnings


def _get(cfg: config_mod.Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _same_tokenizer(path: Path, tokenizer_json: str | None) -> bool:
    """Whether the checkpoint's tokenizer.json is `tokenizer_json` (True when either is unknown)."""
    if tokenizer_json is None or not (path / "tokenizer.json").is_file():
        return True
    try:
        return json.loads((path / "tokenizer.json").read_text()) == json.loads(tokenizer_json)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: tokenizer.json is unreadable") from None


STATE_FILES = ("model.pt", "optimizer.pt", "rng.pt", "trainer.json")  # what a resume loads
SHARDED_FILES = ("rng.pt", "trainer.json")  # and from a sharded checkpoint, besides the pieces
SHARDED = "sharded"  # in a resume's files: the folder whose pieces hold the model and optimizer


def read_state(path: Path) -> dict[str, Any]:
    """The files of checkpoint (or snapshot) `path` that a resume loads; a sharded checkpoint's
    model and optimizer are read later, each rank its own pieces (`SHARDED` names the folder)."""
    sharded = is_sharded(path)
    try:
        files = {name: ckpt.read_file(path, name) for name in (SHARDED_FILES if sharded else STATE_FILES)}
    except Exception as exc:  # a file that passed its checksum but does not load is still unusable
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    if sharded:
        files[SHARDED] = path
    return files


def restore_state(files: dict[str, Any], load_weights: Callable[[dict[str, Any]], None], rank: int,
                  name: str) -> TrainState:
    """Load a saved state written by any layout: a checkpoint's files (`read_state`) or a copy
    kept in memory. `load_weights(files)` loads this rank's part of the model and optimizer;
    `name` names the state in errors."""
    try:
        load_weights(files)
    except KeyError as exc:
        raise CheckpointError(f"{name} does not match the model: {exc.args[0]}") from None
    states = files["rng.pt"]["torch_cpu"]
    if rank < len(states):  # on a larger world, new ranks keep their seeded state
        torch.set_rng_state(states[rank])
    meta = files["trainer.json"]
    return TrainState(step=int(meta["step"]), tokens=int(meta["tokens"]))
