"""Branch-Train-Merge on the two built-in corpora (Shakespeare and Python code) against a dense
model trained for the same total number of steps.

1. seed: `tiny` on the two domains mixed, --seed-steps steps;
2. branch into one expert per domain and train each for --expert-steps steps (no communication);
3. merge by uniform parameter averaging; ensemble with the domain posterior;
4. dense: the seed's config on the mixed corpus for seed + experts x expert steps;
5. per-domain perplexity of each expert, the averaged model, the ensemble and the dense model.

The domains are equal-sized slices (--domain-bytes) of each corpus, and the mixed corpus is
the union of their training parts, so every model sees the same text. Prints JSON lines.

    python benchmarks/btm.py [--seed-steps 100] [--expert-steps 200] [--out runs/btm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from plait.data.corpus import read_text, resolve_corpus

COMMON = ["train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=0", "log.tensorboard=false",
          "log.progress=none", "data.tokenizer=byte"]


def plait(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "plait", *args], check=True, capture_output=True, text=True).stdout


def sets(overrides: list[str]) -> list[str]:
    return [item for o in overrides for item in ("--set", o)]


def write_domains(out: Path, size: int, val_fraction: float = 0.05) -> tuple[list[str], str]:
    """One folder per domain and a folder holding both (the mixed corpus). The mixed corpus
    holds exactly each domain's training split (all but the last `val_fraction` of its bytes,
    as the byte tokenizer splits), so the dense model and the experts train on the same text
    and are evaluated on the same unseen validation text."""
    paths = []
    for name in ("shakespeare", "python"):
        text = read_text(resolve_corpus(name))[:size]
        raw = text.encode()
        train_part = raw[:len(raw) - int(len(raw) * val_fraction)].decode(errors="ignore")
        for folder, part in ((out / "data" / name, text), (out / "data" / "mixed", train_part)):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text(part)
        paths.append(str(out / "data" / name))
    return paths, str(out / "data" / "mixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-steps", type=int, default=100)
    parser.add_argument("--expert-steps", type=int, default=200)
    parser.add_argument("--domain-bytes", type=int, default=4_000_000)
    parser.add_argument("--nproc", type=int, default=1, help="processes for the seed and dense runs")
    parser.add_argument("--out", default="runs/btm")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty; choose another --out")
    domains, mixed = write_domains(out, args.domain_bytes)
    timings = {}

    started = time.perf_counter()
    plait("train", "tiny", "--nproc", str(args.nproc), "--run-dir", str(out / "seed"),
          *sets(COMMON + [f"data.corpus={mixed}", f"train.steps={args.seed_steps}"]))
    timings["seed_s"] = time.perf_counter() - started

    started = time.perf_counter()
    plait("btm", "branch", str(out / "btm"), "--seed", str(out / "seed"), "--domains", ",".join(domains),
          "--steps", str(args.expert_steps))
    trained = json.loads(plait("btm", "train", str(out / "btm")).strip().splitlines()[-1])
    plait("btm", "merge", str(out / "btm"))
    timings["experts_s"] = time.perf_counter() - started

    started = time.perf_counter()
    dense_steps = args.seed_steps + len(domains) * args.expert_steps
    plait("train", "tiny", "--nproc", str(args.nproc), "--run-dir", str(out / "dense"),
          *sets(COMMON + [f"data.corpus={mixed}", f"train.steps={dense_steps}"]))
    timings["dense_s"] = time.perf_counter() - started

    report = json.loads(plait("btm", "eval", str(out / "btm"), "--dense", str(out / "dense"), "--windows", "64"))
    for domain, row in report["domains"].items():
        print(json.dumps({"domain": Path(domain).name, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                          for k, v in row.items()}}))
    print(json.dumps({"seed_steps": args.seed_steps, "expert_steps": args.expert_steps, "dense_steps": dense_steps,
                      "collectives_in_expert_training": trained["collectives_per_expert"],
                      **{k: round(v, 1) for k, v in timings.items()}}))


if __name__ == "__main__":
    main()
