"""How a training run uses the low-communication methods: what the trainer builds from
`train.sync` and `parallel.grad_compression`, and the per-rank state they checkpoint.

Local SGD (diloco, noloco, co2). The data-parallel group is the set of workers; tensor,
pipeline and context parallelism stay inside each worker, and ZeRO shards only over the
worker's own context-parallel ranks (the engine's group is `cp`, not `dp x cp`). Each
worker's loss is normalised by the tokens of *its* share of the global batch, so its
inner step is that of its local mean loss, and the outer step (every `sync.inner_steps`
steps) averages how far the workers moved. With H = 1, SGD inside and outer SGD with lr 1
and no momentum this is exactly every-step data parallelism.

Compressed gradients (powersgd, adaptive). Every step, the engine accumulates gradients
without communicating and hands them to the compressor, which replaces them by its
approximation of their sum over dp x cp.

Workers' weights, inner optimizer state, error-feedback residuals and outer state differ
between ranks, so unlike the layout-free checkpoint they are saved per rank
(`local_state.pt`) and a resume needs the same layout.
"""

from __future__ import annotations

from typing import Any

import torch

from plait.comm import Comm, Group
from plait.config import Config
from plait.errors import CheckpointError
from plait.lowcomm.adaptive_rank import AdaptivePowerSGD
from plait.lowcomm.outer import CO2, DiLoCo, NoLoCo
from plait.lowcomm.powersgd import PowerSGDCompressor
from plait.mesh import Mesh
from plait.parallel.parallelize import is_local_sync
from plait.parallel.zero import ZeroEngine


def loss_workers(cfg: Config) -> int:
    """How many equal parts the global batch's token count is divided into for the loss."""
    return cfg.parallel.dp if is_local_sync(cfg) else 1


class LocalSync:
    """The outer optimizer of a local-SGD run, called after every inner step."""

    def __init__(self, cfg: Config, model: torch.nn.Module, engine: ZeroEngine, comm: Comm, workers: Group):
        self.cfg, self.model, self.engine, self.comm, self.workers = cfg, model, engine, comm, workers
        self.outer = self._make_outer()

    def _make_outer(self) -> DiLoCo | NoLoCo | CO2:
        """The outer optimizer, its slow weights taken from the model's current weights."""
        s, mode, params = self.cfg.sync, self.cfg.train.sync, list(self.model.parameters())
        if mode == "diloco":
            return DiLoCo(params, self.comm, self.workers, s.inner_steps, s.outer_lr, s.outer_momentum, s.nesterov,
                          fragments=s.fragments, bf16_pseudo_grads=s.bf16)
        if mode == "noloco":
            return NoLoCo(params, self.comm, self.workers, s.inner_steps, s.outer_lr, s.outer_momentum,
                          group_size=s.group_size, seed=self.cfg.train.seed)
        return CO2(params, self.comm, self.workers, s.inner_steps, s.outer_lr, s.outer_momentum,
                   gap_penalty=s.gap_penalty, clip=s.clip or None)

    def restart_from_weights(self) -> None:
        """Fresh outer state from the current weights (resuming a checkpoint without any)."""
        self.outer = self._make_outer()

    def after_step(self, step: int) -> bool:
        """The outer step when one is due (then the engine's masters follow the new weights).

        Nothing special happens at a run's last step, so that extending a run continues the
        same trajectory: the final weights are dp rank 0's unless the last step is a sync step.
        """
        synced = self.outer.after_inner_step(step)
        if synced:
            self.engine.reload_masters()
        return synced

    def state_dict(self) -> dict[str, Any]:
        return {"outer": self.outer.state_dict(), "weights": [m.detach().cpu().clone() for m in self.engine.masters],
                "optimizer": self.engine.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state["outer"])
        self.engine.load_local(state["weights"], state["optimizer"])


class CompressedGradients:
    """Replaces the engine's gradient all-reduce by PowerSGD (optionally with adaptive ranks)."""

    def __init__(self, cfg: Config, engine: ZeroEngine, comm: Comm, group: Group):
        c = cfg.compression
        if cfg.parallel.grad_compression == "adaptive":
            self.method = AdaptivePowerSGD(c.rank, c.warmup_steps, c.adjust_every, c.min_compression,
                                           seed=cfg.train.seed)
            self.compressor = self.method.compressor
        else:
            self.method = self.compressor = PowerSGDCompressor(c.rank, c.warmup_steps, c.min_compression,
                                                               seed=cfg.train.seed)
        self.comm, self.group = comm, group
        self.reductions = 0  # steps reduced so far: PowerSGD's warm-up and adjust schedule
        engine.grad_sync = self

    def after_step(self, step: int) -> bool:
        return False  # all the work happens inside the engine's gradient sync

    def restart_from_weights(self) -> None:
        pass  # residuals and warm starts begin afresh

    def __call__(self, grads: dict[str, torch.Tensor]) -> None:
        self.reductions += 1
        self.method.reduce(grads, self.group, self.comm, self.reductions)

    def state_dict(self) -> dict[str, Any]:
        return {"reductions": self.reductions, "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reductions = state["reductions"]
        self.compressor.load_state_dict(state["compressor"])


LOCAL_STATE_FILE = "local_state.pt"  # every rank's state in one file (checkpoints before per-rank files)
LOCAL_LAYOUT_FILE = "local_state.json"  # the layout whose ranks wrote local_state-rank*.pt


def local_state_file(rank: int) -> str:
    """Each rank's own file of per-worker state in a checkpoint: written and read by that rank
    alone, so no rank ever holds another's (a whole model's worth each, for DiLoCo's anchor)."""
    return f"local_state-rank{rank:05d}.pt"


def restore_local_state(method: LocalSync | CompressedGradients, saved: dict[str, Any] | None, layout: str,
                        rank: int, name: str) -> None:
    """This rank's part of `saved` (a checkpoint's LOCAL_STATE_FILE, None when it has none),
    which must come from the same layout; `name` names the checkpoint in errors."""
    if saved is None:
        method.restart_from_weights()  # e.g. a checkpoint of an every-step run
        return
    if saved["layout"] != layout:
        raise CheckpointError(
            f"{name} holds per-worker local-SGD/compression state of layout "
            f"{saved['layout']}; resume it with the same layout (this run: {layout})")
    method.load_state_dict(saved["ranks"][rank])


def build(cfg: Config, model: torch.nn.Module, engine: ZeroEngine, comm: Comm, mesh: Mesh
          ) -> LocalSync | CompressedGradients | None:
    """What this run needs, if anything (collective-free: every rank builds the same)."""
    if is_local_sync(cfg):
        return LocalSync(cfg, model, engine, comm, mesh.dp)
    if cfg.parallel.grad_compression != "none":
        return CompressedGradients(cfg, engine, comm, mesh.dp_cp)
    return None
