"""What a run writes while it trains: metrics.jsonl, events.jsonl, TensorBoard, the console.

Only global rank 0 writes. metrics.jsonl gets one JSON object per optimizer step and is
flushed every step, so a crash loses nothing already measured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
    return rows


class RunLog:
    """Appends metrics and events for rank 0; every method is a no-op on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._metrics = self._events = self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (run_dir / METRICS_FILE).open("a")
        self._events = (run_dir / EVENTS_FILE).open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_metrics(self, last_step: int) -> int:
        """Keep rows up to `last_step` (the resumed checkpoint) so the file stays one history.

        Returns how many rows of steps that will be redone were dropped.
        """
        if not self.enabled:
            return 0
        path = Path(self._metrics.name)
        self._metrics.close()
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("step", 0) <= last_step]
        if len(kept) != len(rows):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
        self._metrics = path.open("a")
        return len(rows) - len(kept)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if row.get(key) is not None:
                    self._tb.add_scalar(key, row[key], row["step"])

    def event(self, kind: str, /, **fields: Any) -> None:
        if not self.enabled:
            return
        self._events.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
        self._events.flush()

    def close(self) -> None:
        for handle in (self._metrics, self._events, self._tb):
            if handle is not None:
                handle.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A live rich progress bar on a terminal, plain lines otherwise (log files, CI)."""

    def __init__(self, total_steps: int, first_step: int, mode: str, every: int, enabled: bool):
        self.enabled = enabled and mode != "none"
        self.every = every
        self.total = total_steps
        self.start_step = first_step
        self.started = time.monotonic()
        self._rich = None
        if self.enabled and (mode == "rich" or (mode == "auto" and sys.stdout.isatty())):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self._rich = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
            )
            self._task = self._rich.add_task("train", total=total_steps, completed=first_step, status="")
            self._rich.start()

    def update(self, step: int, loss: float, tokens_per_s: float, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        status = f"loss {loss:.4f}  {tokens_per_s / 1e3:.1f}k tok/s"
        if val_loss is not None:
            status += f"  val {val_loss:.4f}"
        if self._rich is not None:
            self._rich.update(self._task, completed=step, status=status)
            return
        if step % self.every == 0 or step == self.total or val_loss is not None:
            done = step - self.start_step
            eta = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} | {status} | eta {format_duration(eta)}", flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
