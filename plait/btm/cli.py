"""`plait btm branch|train|merge|eval`: the command line of Branch-Train-Merge (workflow.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plait.btm import workflow as btm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait btm", description="Branch-Train-Merge: domain experts "
                                     "trained with no communication between them, then merged")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("branch", help="start one expert per domain from a seed checkpoint")
    p.add_argument("btm_dir", help="directory to create the experts in")
    p.add_argument("--seed", required=True, help="seed checkpoint, or a run directory (its newest checkpoint)")
    p.add_argument("--domains", required=True, help="comma-separated corpora, one expert each")
    p.add_argument("--steps", type=int, required=True, help="training steps per expert after the seed's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every expert (repeatable)")
    p = sub.add_parser("train", help="train the experts one after another (each in a world of its own)")
    p.add_argument("btm_dir")
    p.add_argument("--expert", default=None, help="train only this expert (e.g. on another machine)")
    p = sub.add_parser("merge", help="average the experts' parameters into BTM_DIR/merged")
    p.add_argument("btm_dir")
    p.add_argument("--weights", default=None, help="comma-separated weights, one per expert (default: equal)")
    p = sub.add_parser("eval", help="per-domain perplexity of each expert, the merged model and the ensemble")
    p.add_argument("btm_dir")
    p.add_argument("--windows", type=int, default=32, help="validation windows per domain")
    p.add_argument("--posterior-windows", type=int, default=4,
                   help="windows per domain used to estimate the ensemble's domain posterior")
    p.add_argument("--dense", default=None, help="a dense run directory to evaluate alongside")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.btm_dir)
    if args.action == "branch":
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        for path in btm.branch(root, Path(args.seed), domains, args.steps, args.overrides):
            print(f"branched {path}")
    elif args.action == "train":
        calls = btm.train(root, args.expert)
        print(json.dumps({"collectives_per_expert": calls}))
    elif args.action == "merge":
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        print(f"wrote {btm.merge(root, weights)}")
    else:
        report = btm.evaluate(root, args.windows, args.posterior_windows, Path(args.dense) if args.dense else None)
        print(json.dumps(report, indent=1))
    return 0
