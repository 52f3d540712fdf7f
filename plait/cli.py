"""The `plait` command line: train, sample, plot, prepare, export, plan.

Any PlaitError (bad config, data or checkpoint) ends the command with exit status 2 and
one line on stderr naming the problem; nothing is printed twice by the ranks of a job.

Modules that load torch are imported inside the commands that use them: torch takes about
a second to import, and `plait --help` or `plait plan` never need it.
"""

from __future__ import annotations

import argparse
import copy
import errno
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from plait import config as config_mod
from plait.errors import CollectiveOSError, PlaitError
from plait.outputs import check_output_file, parse_size
from plait.plan.cli import main as plan_main
from plait.resilience.sentinel import die_with_launcher
from plait.resilience.usage_errors import (
    note_environment_error,
    note_interrupted,
    note_usage_error,
    noted_status,
)
from plait.train.rundir import claim_run_dir, held_by_launcher

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
ENVIRONMENT_ERROR = 1  # the machine refused (disk full, permission denied): one line, no restart
# OSErrors that name a problem of the machine or the paths given, not of plait.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.EFBIG, errno.EMFILE,
    errno.ELOOP, errno.EIO,
})


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (locally on N processes, or as one rank under torchrun)")
    p.add_argument("config", nargs="?", default="tiny", help="a preset name (default: tiny) or a TOML file")
    p.add_argument("--nproc", type=int, default=None,
                   help="local worker processes (default: GPUs if any, else 2); ignored under torchrun")
    p.add_argument("--run-dir", default=None, help="where the run writes (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="train into a non-empty folder that is not a plait run (its config.toml may be overwritten)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("plot", help="draw loss against step for one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("-o", "--output", default=None,
                   help="image file, .png/.pdf/.svg... (default: loss.png in the first run dir)")
    p = sub.add_parser("export", help="write the model with Hugging Face Llama parameter names")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="a .safetensors file (config.json goes beside it)")
    p.add_argument("--force", action="store_true", help="overwrite the .safetensors file and config.json")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="split a larger model into Hugging Face shards with an index (bytes, or e.g. 500MB, 2GB; "
                        "default 5GB)")
    sub.add_parser("prepare", help="tokenise corpora once into a prepared folder (or one .bin token file)",
                   add_help=False)
    sub.add_parser("plan", help="predict memory, step time and MFU of parallel layouts", add_help=False)
    sub.add_parser("btm", help="Branch-Train-Merge: branch, train, merge and evaluate domain experts",
                   add_help=False)
    return parser


def default_nproc() -> int:
    # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_mod.load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    under_launcher = "WORLD_SIZE" in os.environ
    nproc = 1 if under_launcher else (args.nproc if args.nproc is not None else default_nproc())
    if nproc < 1:
        raise PlaitError(f"--nproc {nproc} must be at least 1")
    # One writer per run directory (train/rundir.py): the job's top process holds the lock; a
    # worker whose launcher holds it, and torchrun's ranks other than 0, do not.
    if under_launcher and (held_by_launcher(run_dir) or os.environ.get("RANK", "0") != "0"):
        claim = nullcontext()
    else:
        claim = claim_run_dir(run_dir, force=args.force)
    with claim:
        if under_launcher or nproc == 1:
            noted = noted_status()
            if noted is not None:  # an earlier worker generation said why; restarting cannot help
                return noted
            # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
            from plait.resilience.worker import train_with_resilience

            if under_launcher:  # a worker: its launcher handles Ctrl-C and SIGTERM for the job
                train_with_resilience(cfg, run_dir)
                return 0
            # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
            from plait.launch import run_interruptible

            def train_here() -> int:
                train_with_resilience(cfg, run_dir)
                return 0

            return run_interruptible(train_here, run_dir)
        # Check everything that can be checked before any worker starts, and build the data
        # caches once here so the workers only read them.
        # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
        from plait.data import check_corpus, load_data
        from plait.launch import launch_local

        config_mod.validate(copy.deepcopy(cfg), world_size=nproc)
        check_corpus(cfg.data)
        load_data(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
        claim.share_with_workers()
        return launch_local(nproc, argv, cfg=cfg, run_dir=run_dir)


def cmd_sample(args: argparse.Namespace) -> int:
    # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
    from plait.train.sample import generate
    from plait.train.trained import load_trained, report_choice

    trained = load_trained(Path(args.run_dir))
    report_choice(trained)
    text = generate(trained.model, trained.tokenizer, args.prompt, args.tokens, trained.cfg.model.seq_len,
                    seed=args.seed, temperature=args.temperature)
    print(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
    from plait.plot import plot_runs

    output = Path(args.output) if args.output else Path(args.run_dirs[0]) / "loss.png"
    plot_runs([Path(d) for d in args.run_dirs], output)
    print(f"wrote {output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
    from plait.export import export_hf
    from plait.train.trained import load_trained, report_choice

    output = Path(args.output)
    check_output_file(output, "-o", args.force)  # before the model is loaded: fail fast on a typo
    trained = load_trained(Path(args.run_dir), weights=False)  # a sharded checkpoint's tensors: read as written
    written = export_hf(trained, output, force=args.force, max_shard_size=args.max_shard_size)
    report_choice(trained)  # after the writes: a refused export says only why, in one line
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_launcher()  # a worker of plait's launcher never outlives it
    try:
        if argv and argv[0] == "prepare":
            # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
            from plait.data.prepare import main as prepare_main

            sys.exit(prepare_main(argv[1:]))
        if argv and argv[0] == "btm":
            # lazy: loads torch (~1 s), which `plait --help` and `plait plan` never need
            from plait.btm.cli import main as btm_main

            sys.exit(btm_main(argv[1:]))
        if argv and argv[0] == "plan":
            sys.exit(plan_main(argv[1:]))
        args = build_parser().parse_args(argv)
        handlers = {
            "train": lambda: cmd_train(args, argv),
            "sample": lambda: cmd_sample(args),
            "plot": lambda: cmd_plot(args),
            "export": lambda: cmd_export(args),
        }
        sys.exit(handlers[args.command]())
    except PlaitError as exc:
        note_usage_error()
        if _is_main_rank():  # every rank raises the same collective error; say it once
            print(f"plait: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        # A worker: the launcher got the same Ctrl-C and says where the run stopped.
        note_interrupted(INTERRUPTED)
        sys.exit(INTERRUPTED)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise_unexpected()
        # The machine, not the program: a full disk, a read-only or unwritable path, a file
        # where a folder should be. Restarting cannot help, so the job ends here.
        note_environment_error()
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        if not isinstance(exc, CollectiveOSError) or _is_main_rank():  # a collective one: said once
            print(f"plait: error{where if not isinstance(exc, CollectiveOSError) else ''}: "
                  f"{describe_os_error(exc)}", file=sys.stderr, flush=True)
        sys.exit(ENVIRONMENT_ERROR)
    except Exception:
        raise_unexpected()


def raise_unexpected() -> None:
    """A bug, not bad input: the traceback, labelled with the rank, and exit status 1.

    Unless another worker of the job has already ended it with a usage or environment error, or
    was interrupted: then this failure (a collective whose peer left) is only its echo, and the
    worker leaves quietly with the same status."""
    noted = noted_status()
    if noted is not None:
        sys.exit(noted)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    sys.stderr.write("".join(prefix + line + "\n" for line in traceback.format_exc().splitlines()))
    sys.exit(1)


def describe_os_error(exc: OSError) -> str:
    """`No space left on device: runs/x/metrics.jsonl`: the reason, then the path it concerns."""
    reason = exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return reason + (": " + " -> ".join(paths) if paths else "")
