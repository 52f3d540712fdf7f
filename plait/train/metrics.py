"""What a run writes while it trains: metrics.jsonl, events.jsonl, TensorBoard, the console.

Only global rank 0 writes. metrics.jsonl gets one JSON object per optimizer step and is
flushed every step, so a crash loses nothing already measured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from plait.train.rundir import json_text, write_text_atomic

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"
# How the indices of a row's lists are named in TensorBoard tags: the lists are MoE metrics,
# one value per MoE layer (moe_imbalance) or per layer and expert (moe_load).
LIST_LEVELS = ("layer", "expert")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return parse_jsonl(path.read_text(errors="replace"))


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The JSON objects of `text`, one a line; a torn line (from a crash) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def scalar_tags(row: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(TensorBoard tag, value) for every number of a metrics row but its step.

    A key is its own tag, so the tags dashboards already use (loss, lr, ...) keep their names;
    a list gives one tag per index (moe_imbalance/layer3, moe_load/layer3/expert5). None (not
    measured this step) is skipped; text is not a scalar.
    """
    for key, value in row.items():
        if key != "step":
            yield from _flatten(key, value, 0)


def _flatten(tag: str, value: Any, depth: int) -> Iterator[tuple[str, float]]:
    if isinstance(value, (list, tuple)):
        level = LIST_LEVELS[depth] if depth < len(LIST_LEVELS) else "index"
        for i, item in enumerate(value):
            yield from _flatten(f"{tag}/{level}{i}", item, depth + 1)
    elif isinstance(value, (int, float)):
        yield tag, value


class RunLog:
    """Appends metrics and events for rank 0; every method is a no-op on other ranks.

    Nothing is created until the first write, so a run refused at start (a resume that does
    not fit) leaves its run directory exactly as it was.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.run_dir, self.tensorboard = enabled, run_dir, tensorboard
        self._files: dict[str, TextIO] = {}
        self._tb = None
        # After a resume: the first step that will be (re)done. TensorBoard drops what older
        # event files hold from that step on, so a redone step shows one value, not two.
        self._tb_purge_step: int | None = None

    def _append(self, name: str, line: str) -> None:
        path = self.run_dir / name
        try:
            if name not in self._files:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._files[name] = path.open("a")
            self._files[name].write(line)
            self._files[name].flush()
        except OSError as exc:  # a full disk says which file it refused
            raise OSError(exc.errno, exc.strerror, str(path)) from None

    def truncate_metrics(self, last_step: int) -> int:
        """Keep rows up to `last_step` (the resumed checkpoint) so the file stays one history.

        The file is rewritten whenever a line goes: a row of a step that will be redone, or a
        torn line from a crash (left in place, the next row would be appended onto it).
        Returns how many rows of steps that will be redone were dropped.
        """
        if not self.enabled:
            return 0
        self._tb_purge_step = last_step + 1
        if self._tb is not None:  # reopened on the next row, with the purge marker first
            self._tb.close()
            self._tb = None
        path = self.run_dir / METRICS_FILE
        if METRICS_FILE in self._files:
            self._files.pop(METRICS_FILE).close()
        if not path.exists():
            return 0
        text = path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        rows = parse_jsonl(text)
        kept = [r for r in rows if r.get("step", 0) <= last_step]
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            write_text_atomic(path, "".join(json_text(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(METRICS_FILE, json_text(row) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for tag, value in scalar_tags(row):
                tb.add_scalar(tag, value, row["step"])
            # Like metrics.jsonl, every step reaches the disk: the writer's own queue would
            # lose the steps before a crash, which a resume does not redo.
            tb.flush()

    def _tensorboard(self):
        if self._tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._tb_purge_step)
            self._tb_purge_step = None  # written once, at the head of this event file
        return self._tb

    def event(self, kind: str, /, **fields: Any) -> None:
        if not self.enabled:
            return
        self._append(EVENTS_FILE, json_text({"event": kind, "time": time.time(), **fields}) + "\n")

    def close(self) -> None:
        for handle in (*self._files.values(), self._tb):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass  # every line was flushed when written: a failing close loses nothing
        self._files.clear()
        self._tb = None


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
