"""`plait plot`: loss (and validation loss) against step for several runs on one figure."""

from __future__ import annotations

from pathlib import Path

from plait.errors import PlaitError
from plait.train.metrics import METRICS_FILE, read_jsonl


def plot_runs(run_dirs: list[Path], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir in run_dirs:
        rows = read_jsonl(run_dir / METRICS_FILE)
        if not rows:
            raise PlaitError(f"{run_dir / METRICS_FILE} has no metrics to plot")
        label = run_dir.name or str(run_dir)
        line, = ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{label} loss", lw=1)
        evals = [r for r in rows if r.get("val_loss") is not None]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--",
                    color=line.get_color(), label=f"{label} val", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
