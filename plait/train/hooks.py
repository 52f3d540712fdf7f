"""How a mode plugs into the training loop without the loop knowing about it.

A mode (resilience's snapshots and watchdog, elastic membership, ...) subclasses
`TrainingHooks` and overrides the calls it needs; the rest stay no-ops. The trainer calls
every hook object it was given, in order:

- `attach(trainer)`: once, at the end of the trainer's construction;
- `choose_resume(path, rejected, source)`: rank 0, before a resume: may offer a newer state;
- `locate(path)`: every rank, the state rank 0 chose: where this rank reads it (a snapshot in
  each node's own memory has the same name on every node);
- `resumed(trainer, steps_redone, source)`: every rank, once the resume is accepted;
- `begin_step(step)` / `end_step(trainer, step, step_time_s)`: around each optimizer step,
  `end_step` after the step's metrics and checkpoint are written;
- `phase(name)`: the loop enters a phase that may legitimately outlast a step ("eval",
  "checkpoint", "finish"), or goes back to training steps ("step"): a hang detector must
  not count a rank that is busy there as missing from a collective;
- `close(finished)`: when the trainer closes, whether the run finished or failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the trainer imports this module; the hooks only take trainers as arguments
    from plait.train.trainer import Trainer

Rejected = list[tuple[Path, str]]  # unusable checkpoints or snapshots, each with the reason


class TrainingHooks:
    """The calls a mode receives from the training loop; each does nothing unless overridden."""

    def attach(self, trainer: Trainer) -> None:
        """The trainer is built (runtime, comm, mesh, model); nothing has been resumed or run yet."""

    def choose_resume(self, path: Path | None, rejected: Rejected, source: str
                      ) -> tuple[Path | None, Rejected, str]:
        """Rank 0: the state to resume from, given the newest valid checkpoint on disk.

        `path` is that checkpoint (None: none yet) and `source` says so ("disk" / "scratch");
        a hook that keeps a newer state elsewhere returns it instead, with its own source."""
        return path, rejected, source

    def locate(self, path: Path) -> Path:
        """Where this rank reads the state rank 0 chose to resume from (`path` on rank 0)."""
        return path

    def resumed(self, trainer: Trainer, steps_redone: int, source: str) -> None:
        """Every rank, once the resume is accepted: the run continues at `trainer.state.step`;
        `steps_redone` metric rows of a previous attempt were dropped."""

    def begin_step(self, step: int) -> None:
        """Before optimizer step `step` starts."""

    def end_step(self, trainer: Trainer, step: int, step_time_s: float) -> None:
        """After step `step` is committed (metrics logged, a due checkpoint written). A hook may
        raise here to leave the loop at this step boundary."""

    def phase(self, name: str) -> None:
        """The loop enters phase `name`: "eval", "checkpoint", "finish", or "step" again."""

    def close(self, finished: bool) -> None:
        """The trainer closes: `finished` when every configured step was run."""


class HookChain(TrainingHooks):
    """Several hooks as one: each call goes to every hook, in the order given."""

    def __init__(self, hooks: Sequence[TrainingHooks] = ()):
        self.hooks = list(hooks)

    def attach(self, trainer: Trainer) -> None:
        for hook in self.hooks:
            hook.attach(trainer)

    def choose_resume(self, path: Path | None, rejected: Rejected, source: str
                      ) -> tuple[Path | None, Rejected, str]:
        for hook in self.hooks:
            path, rejected, source = hook.choose_resume(path, rejected, source)
        return path, rejected, source

    def locate(self, path: Path) -> Path:
        for hook in self.hooks:
            path = hook.locate(path)
        return path

    def resumed(self, trainer: Trainer, steps_redone: int, source: str) -> None:
        for hook in self.hooks:
            hook.resumed(trainer, steps_redone, source)

    def begin_step(self, step: int) -> None:
        for hook in self.hooks:
            hook.begin_step(step)

    def end_step(self, trainer: Trainer, step: int, step_time_s: float) -> None:
        for hook in self.hooks:
            hook.end_step(trainer, step, step_time_s)

    def phase(self, name: str) -> None:
        for hook in self.hooks:
            hook.phase(name)

    def close(self, finished: bool) -> None:
        # Every hook closes (a watchdog must stop) even when an earlier one fails; the first
        # failure is raised afterwards.
        failure: BaseException | None = None
        for hook in self.hooks:
            try:
                hook.close(finished)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
        if failure is not None:
            raise failure
