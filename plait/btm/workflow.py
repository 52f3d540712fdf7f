"""Branch-Train-Merge (Li et al. 2022): experts branched from one seed checkpoint, each trained
on its own domain with no communication between them, then merged.

A BTM directory holds `btm.json` (the domains, the seed checkpoint) and one ordinary run
directory per expert, `expert-<i>-<domain>/`, whose checkpoints start with a copy of the
seed's. So every expert is a normal plait run: `plait train`, `sample`, `export` and resume
work on it, and experts can be trained one after another here or on different machines.

- branch: copy the seed checkpoint into each expert, with the seed's config pointed at the
  expert's corpus and `steps` more training steps;
- train: train the experts in turn, each in a world of its own (one process, so no
  collective is ever entered: `Comm.calls` stays 0, which `train` reports per expert);
- merge: weighted parameter averaging into `merged/`, itself a loadable run directory;
- eval: per-domain perplexity of each expert, the merged model and the ensemble whose
  weights are the domain posterior P(expert | data) ∝ exp(log-likelihood of a few of the
  domain's validation sequences) under a uniform prior, measured on the other sequences.

Experts must share a tokenizer to be averaged or ensembled: BTM here uses the byte tokenizer.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from plait import config as config_mod
from plait.data import eval_starts, get_batch, load_data
from plait.errors import CheckpointError, ConfigError, PlaitError
from plait.train import checkpoint as ckpt
from plait.train.runtime import init_runtime
from plait.train.trained import Trained, load_trained
from plait.train.trainer import Trainer

MANIFEST = "btm.json"
MERGED = "merged"


def _read_manifest(btm_dir: Path) -> dict[str, Any]:
    path = btm_dir / MANIFEST
    if not path.is_file():
        raise PlaitError(f"'{btm_dir}' is not a BTM directory (no {MANIFEST}; run `plait btm branch` first)")
    return json.loads(path.read_text())


def expert_dirs(btm_dir: Path) -> list[Path]:
    return [btm_dir / name for name in _read_manifest(btm_dir)["experts"]]


def _slug(domain: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(domain).stem or domain).strip("-") or "domain"


def branch(btm_dir: Path, seed: Path, domains: list[str], steps: int, overrides: list[str] = ()) -> list[Path]:
    """Start one expert per domain from the seed checkpoint (a checkpoint or a run directory)."""
    if len(domains) < 1:
        raise ConfigError("btm branch: --domains needs at least one corpus")
    if steps < 1:
        raise ConfigError(f"btm branch: --steps={steps} must be at least 1")
    seed_ckpt = seed
    if not (seed / ckpt.MANIFEST).exists():
        found, _ = ckpt.newest_valid(seed / "checkpoints" if (seed / "checkpoints").is_dir() else seed)
        if found is None:
            raise CheckpointError(f"btm branch: no valid checkpoint in '{seed}'")
        seed_ckpt = found
    problem = ckpt.problem_with(seed_ckpt)
    if problem:
        raise CheckpointError(f"btm branch: seed checkpoint '{seed_ckpt}' is not usable: {problem}")
    seed_cfg = config_mod.load_config(str(seed_ckpt / "config.toml"))
    if seed_cfg.data.tokenizer != "byte":
        raise ConfigError("btm branch: experts must share a tokenizer to be merged; use data.tokenizer=byte")
    seed_step = int(ckpt.read_file(seed_ckpt, "trainer.json")["step"])
    if (btm_dir / MANIFEST).exists():
        raise PlaitError(f"btm branch: '{btm_dir}' already holds a BTM run; use another directory")
    names = []
    for i, domain in enumerate(domains):
        name = f"expert-{i}-{_slug(domain)}"
        cfg = config_mod.load_config(str(seed_ckpt / "config.toml"), list(overrides))
        cfg.name, cfg.data.corpus = name, domain
        cfg.train.steps, cfg.checkpoint.resume = seed_step + steps, "auto"
        run_dir = btm_dir / name
        shutil.copytree(seed_ckpt, run_dir / "checkpoints" / seed_ckpt.name)
        (run_dir / "config.toml").write_text(config_mod.to_toml(cfg))
        names.append(name)
    manifest = {"seed": str(seed_ckpt), "seed_step": seed_step, "domains": domains, "experts": names}
    (btm_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return [btm_dir / n for n in names]


def train(btm_dir: Path, only: str | None = None) -> dict[str, int]:
    """Train the experts one after another in this process; returns each one's count of
    collectives entered (through the comm module), which BTM keeps at zero."""
    calls = {}
    for run_dir in expert_dirs(btm_dir):
        if only is not None and run_dir.name != only:
            continue
        cfg = config_mod.load_config(str(run_dir / "config.toml"))
        trainer = Trainer(cfg, run_dir, init_runtime(cfg))
        try:
            trainer.start()
            trainer.fit()
            calls[run_dir.name] = trainer.comm.calls
            trainer.log.event("btm_expert_trained", collectives=trainer.comm.calls)
        finally:
            trainer.close()
    if only is not None and not calls:
        raise PlaitError(f"btm train: no expert named '{only}' in {btm_dir}")
    return calls


def average(state_dicts: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_j w_j θ_j with the weights normalised to sum to one (fp32)."""
    if len(weights) != len(state_dicts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"btm merge: weights {weights} must be one non-negative number per expert, not all 0")
    total = sum(weights)
    return {name: sum(w / total * sd[name].float() for w, sd in zip(weights, state_dicts))
            for name in state_dicts[0]}


def merge(btm_dir: Path, weights: list[float] | None = None) -> Path:
    """Average the experts' newest checkpoints into `merged/` (a run directory)."""
    experts = [load_trained(d) for d in expert_dirs(btm_dir)]
    weights = weights or [1.0] * len(experts)
    merged = average([{n: p.detach() for n, p in e.model.named_parameters()} for e in experts], weights)
    cfg = experts[0].cfg
    cfg.name = "btm-merged"
    files = {
        "model.pt": merged,
        "config.toml": config_mod.to_toml(cfg),
        "tokenizer.json": (experts[0].path / "tokenizer.json").read_text(),
        "trainer.json": {"step": max(e.step for e in experts), "merged_from": [str(e.path) for e in experts],
                         "weights": weights},
    }
    return ckpt.write_checkpoint(btm_dir / MERGED / "checkpoints", max(e.step for e in experts), files)


@torch.no_grad()
def _token_log_probs(model: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, seq_len: int,
                     batch: int = 8) -> torch.Tensor:
    """log p(target) of every target token of the windows, [n_windows, seq_len]."""
    model.eval()
    out = []
    for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / batch))):
        inputs, targets = get_batch(tokens, chunk, seq_len)
        logits = model(inputs, None).float()
        out.append(torch.gather(F.log_softmax(logits, -1), -1, targets.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


def evaluate(btm_dir: Path, windows: int = 32, posterior_windows: int = 4,
             dense: Path | None = None) -> dict[str, Any]:
    """Per-domain perplexity of every expert, the merged model, the ensemble (and a dense run)."""
    manifest = _read_manifest(btm_dir)
    experts = [load_trained(d) for d in expert_dirs(btm_dir)]
    models: dict[str, Trained] = {d.name: e for d, e in zip(expert_dirs(btm_dir), experts)}
    if (btm_dir / MERGED).is_dir():
        models["merged"] = load_trained(btm_dir / MERGED)
    if dense is not None:
        models["dense"] = load_trained(dense)
    seq_len = experts[0].cfg.model.seq_len
    report: dict[str, Any] = {"domains": {}}
    for domain in manifest["domains"]:
        data_cfg = replace(experts[0].cfg.data, corpus=domain)
        val = load_data(data_cfg, experts[0].cfg.model.vocab_size, seq_len).val
        starts = eval_starts(len(val), seq_len, posterior_windows + windows)
        if len(starts) < posterior_windows + 1:
            raise PlaitError(f"btm eval: the validation split of '{domain}' is too short")
        prior_part, test_part = starts[:posterior_windows], starts[posterior_windows:]
        row = {}
        log_probs = {name: _token_log_probs(trained.model, val, test_part, seq_len)
                     for name, trained in models.items()}
        for name, lp in log_probs.items():
            row[name] = math.exp(-float(lp.mean()))
        # Domain posterior from the first windows, then the mixture of the experts' predictions.
        likelihoods = torch.stack([_token_log_probs(e.model, val, prior_part, seq_len).sum() for e in experts])
        posterior = torch.softmax(likelihoods.double(), 0)
        expert_lp = torch.stack([log_probs[d.name].double() for d in expert_dirs(btm_dir)])
        mixture = torch.logsumexp(expert_lp + posterior.log().view(-1, 1, 1), dim=0)
        row["ensemble"] = math.exp(-float(mixture.mean()))
        row["posterior"] = [round(float(p), 6) for p in posterior]
        report["domains"][domain] = row
    return report
