"""ZeRO-3: parameters live as slices; each block's full parameters exist only while it runs.

Every block is one unit (one flat bucket). Just before a block's forward its parameters
are all-gathered into the bucket's flat buffer (the parameters are views into it), and the
next block's gather is started asynchronously so it overlaps this block's compute. After
the forward the buffer's storage is released. Before the block's backward (a hook on the
gradient of its output) the parameters are gathered again, prefetching the previous block;
once the block's gradients have been handed to the reduce-scatter the storage is released
again. The embedding, final norm and LM head form the root unit, gathered for the whole
forward and backward (the tied embedding is used at both ends).

Releasing storage instead of replacing tensors keeps every view, including the ones
autograd saved for backward, pointing at the same memory once it is refilled.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.comm import Handle
from plait.parallel.zero import ZeroEngine


def transformer_units(model: nn.Module) -> list[list[str]]:
    """Parameter names per unit, in the order backward finishes them: last block first, root last."""
    names = [n for n, _ in model.named_parameters()]
    blocks = [[n for n in names if n.startswith(f"blocks.{i}.")] for i in range(len(model.blocks))]
    root = [n for n in names if not n.startswith("blocks.")]
    return list(reversed(blocks)) + [root]


class Zero3Gatherer:
    def __init__(self, engine: ZeroEngine, model: nn.Module):
        self.engine = engine
        n_blocks = len(model.blocks)
        self.block_bucket = [n_blocks - 1 - i for i in range(n_blocks)]  # see transformer_units
        self.root_bucket = n_blocks
        self._pending: dict[int, Handle | None] = {}  # gathered (or gathering) buckets
        engine.reducer.on_bucket_reduced = self.release
        model.register_forward_pre_hook(self._before_model)
        model.register_forward_hook(self._after_model)
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: self._before_block(i))
            block.register_forward_hook(lambda module, args, output, i=i: self._after_block(i, output))

    # --- gathering and releasing ----------------------------------------------------------
    def _start(self, b: int, async_op: bool) -> None:
        engine = self.engine
        full = engine.full_params[b]
        full.untyped_storage().resize_(full.numel() * full.element_size())
        self._pending[b] = engine.comm.all_gather_into(full, engine.param_shards[b], engine.group,
                                                       async_op=async_op, tag="params")

    def ensure(self, b: int) -> None:
        if b not in self._pending:
            self._start(b, async_op=False)
        handle = self._pending[b]
        if handle is not None:
            handle.wait()
            self._pending[b] = None

    def prefetch(self, b: int) -> None:
        if b not in self._pending:
            self._start(b, async_op=True)

    def release(self, b: int) -> None:
        if b not in self._pending:
            return
        handle = self._pending.pop(b)
        if handle is not None:
            handle.wait()
        self.engine.full_params[b].untyped_storage().resize_(0)

    # --- hooks ----------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple) -> None:
        self.ensure(self.root_bucket)
        if self.block_bucket:
            self.prefetch(self.block_bucket[0])

    def _after_model(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            self.release(self.root_bucket)  # evaluation: no backward will come for it

    def _before_block(self, i: int) -> None:
        self.ensure(self.block_bucket[i])
        if i + 1 < len(self.block_bucket):
            self.prefetch(self.block_bucket[i + 1])

    def _after_block(self, i: int, output: torch.Tensor) -> None:
        self.release(self.block_bucket[i])
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(lambda grad, i=i: self._before_block_backward(i))

    def _before_block_backward(self, i: int) -> None:
        self.ensure(self.block_bucket[i])
        if i > 0:
            self.prefetch(self.block_bucket[i - 1])
