"""Micro-batch against global-batch load balancing on two domains (Qwen 2025, "Demons in the
Detail": balancing over the global batch lets experts specialise by domain).

The corpus is the two built-in ones mixed: Shakespeare and the Python standard library,
interleaved in blocks of BLOCK bytes (ASCII only, so byte position = token position and a
token's domain is known). The MoE tiny (8 experts, top-2) trains for the same steps on 2
gloo ranks with `train.lbl_scope = micro_batch` and with `global_batch`; micro-batches are one
sequence, so a micro-batch is (nearly always) one domain, the setting of the paper. Then,
on the validation windows, each expert's routed slots are attributed to the domain of their
token: its specialisation is the fraction from its dominant domain (0.5 = indifferent, 1 =
one domain only; the validation split is close to half and half).

Prints JSON: per scope the final validation loss, the mean specialisation over experts and
MoE layers, and each layer's per-expert scores and loads. About 5 minutes on 2 CPU cores.

    python benchmarks/moe_lbl.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from plait.data.corpus import read_text, resolve_corpus
from plait.model.moe import MoE
from plait.train.trained import load_trained

BLOCK = 4096  # bytes of one domain before the other takes over
PER_DOMAIN = 1_500_000  # bytes taken from each corpus
DOMAINS = ("shakespeare", "python")
SETTINGS = [
    "model.n_experts=8", "model.top_k=2", "model.moe_ffn_dim=128", "model.n_layers=4",
    "train.global_batch=16", "train.micro_batch=1", "train.eval_every=0", "train.eval_batches=2",
    "train.lbl_coef=0.01", "train.sample_tokens=0", "optim.warmup_steps=20",
    "checkpoint.every=0", "checkpoint.resume=never", "log.tensorboard=false", "log.progress=none",
]


def mixed_corpus(path: Path) -> None:
    """Blocks of BLOCK bytes, Shakespeare first, then Python, alternating."""
    texts = []
    for name in DOMAINS:
        text = read_text(resolve_corpus(name))[:PER_DOMAIN]
        texts.append(text.encode("ascii", errors="replace"))  # '?' for the rare non-ASCII character
    blocks = [text[i:i + BLOCK] for i in range(0, PER_DOMAIN, BLOCK) for text in texts]
    path.write_bytes(b"".join(blocks))


def domain_of(positions: np.ndarray) -> np.ndarray:
    return (positions // BLOCK) % 2


def train(corpus: Path, run_dir: Path, scope: str, steps: int, seed: int) -> dict:
    """Train on 2 local ranks; the last step's figures."""
    command = [sys.executable, "-m", "plait", "train", "tiny", "--nproc", "2", "--run-dir", str(run_dir),
               "--set", f"data.corpus={corpus}", "--set", f"train.steps={steps}",
               "--set", f"train.lbl_scope={scope}", "--set", f"train.seed={seed}"]
    for setting in SETTINGS:
        command += ["--set", setting]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"val_loss": round(last["val_loss"], 4), "train_loss": round(last["loss"], 4),
            "moe_lbl": round(last["moe_lbl"], 4),
            "moe_imbalance": [round(x, 3) for x in last["moe_imbalance"]], "train_s": round(seconds, 1)}


@torch.no_grad()
def specialisation(run_dir: Path, corpus: Path, windows: int = 64) -> dict:
    """Route validation windows through the trained model; per MoE layer and expert, the
    fraction of its slots whose token comes from the expert's dominant domain."""
    trained = load_trained(run_dir)
    model, seq = trained.model.eval(), trained.cfg.model.seq_len
    ids = np.frombuffer(corpus.read_bytes(), dtype=np.uint8)
    val_start = len(ids) - int(len(ids) * trained.cfg.data.val_fraction)
    starts = np.linspace(val_start, len(ids) - seq - 1, windows).astype(np.int64)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    chosen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def capture(index):
        def hook(module, args, output):
            _, _, experts, _ = module.route(args[0].reshape(-1, args[0].shape[-1]))
            chosen[index].append(experts)
        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    tokens = torch.from_numpy(np.stack([ids[s:s + seq] for s in starts]).astype(np.int64))
    model(tokens)
    for handle in handles:
        handle.remove()
    domains = torch.from_numpy(domain_of(np.concatenate([np.arange(s, s + seq) for s in starts])))
    per_layer = []
    for index, layer in enumerate(layers):
        experts = torch.cat(chosen[index])  # [tokens, top_k]
        slot_domain = domains[:, None].expand_as(experts)
        counts = torch.zeros(layer.n_experts, 2)
        counts.index_put_((experts.flatten(), slot_domain.flatten()), torch.ones(experts.numel()), accumulate=True)
        load = counts.sum(dim=1)
        score = counts.max(dim=1).values / load.clamp(min=1)
        # An expert that received nothing has no domain: null, and left out of the mean.
        per_layer.append({"specialisation": [round(float(s), 4) if n > 0 else None for s, n in zip(score, load)],
                          "load": [int(n) for n in load]})
    mean = float(np.mean([s for layer in per_layer for s in layer["specialisation"] if s is not None]))
    return {"mean_specialisation": round(mean, 4), "layers": per_layer,
            "python_share_of_tokens": round(float(domains.float().mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    out = {"benchmark": "moe_lbl", "steps": args.steps, "seed": args.seed, "settings": SETTINGS,
           "block_bytes": BLOCK}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("PLAIT_CACHE", str(root / "cache"))
        corpus = root / "shakespeare_python.txt"
        mixed_corpus(corpus)
        for scope in ("micro_batch", "global_batch"):
            run_dir = root / scope
            out[scope] = {**train(corpus, run_dir, scope, args.steps, args.seed), **specialisation(run_dir, corpus)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
