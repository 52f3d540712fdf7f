"""`plait plot`: loss (and validation loss) against step for several runs on one figure."""

from __future__ import annotations

from pathlib import Path

from plait.data.tokenfile import atomic_write
from plait.errors import PlaitError
from plait.outputs import check_output_file
from plait.train.metrics import METRICS_FILE, read_jsonl


def plot_runs(run_dirs: list[Path], output: Path) -> None:
    """Draw the runs' losses into `output`, an image whose suffix names its format (.png, .pdf, .svg...)."""
    import matplotlib  # imported here: slow to import, and only this command needs it

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    image_format = _image_format(output)
    check_output_file(output, "-o", force=True)  # the plot is redrawn in place each time
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
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
        # Written beside the old plot and renamed over it: a failed write keeps the old plot whole.
        atomic_write(output, lambda f: fig.savefig(f, format=image_format, dpi=120))
    finally:
        plt.close(fig)


def _image_format(output: Path) -> str:
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    image_format = output.suffix.lower().lstrip(".")
    if image_format not in formats:
        raise PlaitError(f"-o: '{output}' must end in an image format matplotlib writes: "
                         + ", ".join(f".{f}" for f in sorted(formats)))
    return image_format
