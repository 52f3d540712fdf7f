"""Activation recomputation (train.recompute) and the activation_bytes measurement.

none: autograd keeps everything backward needs. full: each Block keeps only its inputs and
runs its forward again in backward. selective: only the attention core (SDPA or ring
attention) is recomputed, the part whose saved state grows with seq² when the scores are
materialised (Korthikanti et al. 2022). Both use non-reentrant torch.utils.checkpoint and
patch `forward` / `core` on the instances, so module and parameter names do not change.
Apply after tensor and context parallelism, which replace modules and cores.

`count_saved_activation_bytes` measures what a forward pass leaves saved for backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

RecomputeMode = Literal["none", "selective", "full"]
MODES = ("none", "selective", "full")


class SavedBytes:
    """Bytes of distinct storages saved for backward while the counter was active."""

    def __init__(self, skip: Iterable[torch.Tensor]):
        self._weights = list(skip)
        self._skip = self._weight_storages()
        self._seen: set[int] = set()
        self.bytes = 0

    def _weight_storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in self._weights}

    def add(self, tensor: torch.Tensor) -> None:
        if isinstance(tensor, nn.Parameter) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen:
            return
        if key not in self._skip:
            # Weights can move while the counter runs (ZeRO-3 gathers a block's parameters
            # into freshly allocated storage just before it runs): look again before counting.
            self._skip = self._weight_storages()
        if key in self._skip:  # weights (and their views)
            return
        self._seen.add(key)
        self.bytes += storage.nbytes()


# The counter of the innermost active `count_saved_activation_bytes`, so that checkpointed
# regions can report the inputs they hold (autograd's hooks never see those).
_active: contextvars.ContextVar[SavedBytes | None] = contextvars.ContextVar("plait_saved_bytes", default=None)


@contextlib.contextmanager
def count_saved_activation_bytes(parameters: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block, per rank.

    Each storage is counted once (views and tensors saved by several ops share one), and
    storages of `parameters` (pass model.parameters()) are skipped: they are model state,
    not activations. A checkpointed region saves nothing through autograd's hooks; it holds
    its inputs instead, and those are counted. Read `.bytes` after the forward pass.
    """
    counter = SavedBytes(parameters)
    token = _active.set(counter)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counter.add(tensor)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield counter
    finally:
        _active.reset(token)


def _checkpointed(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def run(*args: object) -> torch.Tensor:
        counter = _active.get()
        if counter is not None and torch.is_grad_enabled():
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    counter.add(arg)
        return checkpoint(fn, *args, use_reentrant=False)

    run._plait_recompute = True
    return run


def apply_recompute(model: nn.Module, mode: RecomputeMode) -> None:
    """Recompute per `mode` (in place). Each block is wrapped at most once."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return
    for block in model.blocks:
        if getattr(block.forward, "_plait_recompute", False) or getattr(block.attn.core, "_plait_recompute", False):
            raise ValueError("recomputation is already applied to this model")
        if mode == "full":
            block.forward = _checkpointed(block.forward)
        else:
            block.attn.core = _checkpointed(block.attn.core)
