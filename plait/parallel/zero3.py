"""ZeRO-3: parameters live as slices; each block's full parameters exist only while it runs.

Every block is one unit (one flat bucket). Just before a block's forward its parameters
are all-gathered into the bucket's flat buffer (the parameters are views into it), and the
next block's gather is started asynchronously so it overlaps this block's compute. After
the forward the buffer's storage is released. Before the block's backward (a hook on the
gradient of its output) the parameters are gathered again, prefetching the previous block;
once the gradient of the block's input is complete, its backward is over, and the storage
is released again (also when its gradients are handed to the reduce-scatter).

The embedding, final norm and LM head form the root unit. On the dense model it is
gathered for the whole forward and backward (the tied embedding is used at both ends).

On a pipeline stage (`StageModule`) the forward of a chunk runs once per micro-batch,
interleaved with other micro-batches' backwards, and gradients accumulate over the step
(the engine reduces them once, `ZeroEngine.deferred`). So every gather is tied to one pass:
a block is gathered for each forward and each backward and released in between; blocks are
prefetched only within their chunk (the next chunk may run passes later). The root differs
by stage: the first holds the embedding, gathered for its forward only (the embedding's
backward adds the output gradient to rows by token id and never reads the weight); the last
holds norm and head (with tied embeddings its copy of `embed.weight`), gathered from a head
forward until the last pending head backward is over, so 1F1B's F-then-B on the last stage
gathers it once per micro-batch; a middle stage has no root unit at all.

Releasing storage instead of replacing tensors keeps every view, including the ones
autograd saved for backward, pointing at the same memory once it is refilled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from plait.comm import Handle
from plait.parallel.pipeline_stage import StageModule
from plait.parallel.zero import ZeroEngine


def _block_keys(model: nn.Module) -> list[str]:
    """The blocks' names under `blocks.`: 0..n-1 in the dense model, a stage's own dense
    indices (possibly not contiguous, under interleaving) in a pipeline stage's ModuleDict."""
    if isinstance(model.blocks, nn.ModuleDict):
        return list(model.blocks.keys())
    return [str(i) for i in range(len(model.blocks))]


def transformer_units(model: nn.Module) -> list[list[str]]:
    """Parameter names per unit, in the order backward finishes them: last block first, root
    last. The root unit (parameters outside the blocks) is left out where it would be empty:
    a middle pipeline stage holds no embedding, norm or head."""
    names = [n for n, _ in model.named_parameters()]
    blocks = [[n for n in names if n.startswith(f"blocks.{key}.")] for key in _block_keys(model)]
    root = [n for n in names if not n.startswith("blocks.")]
    return list(reversed(blocks)) + ([root] if root else [])


class Zero3Gatherer:
    """Installs the gather / release hooks on `model` (the dense model or a pipeline stage)
    for an engine built with `transformer_units(model)`."""

    def __init__(self, engine: ZeroEngine, model: nn.Module):
        self.engine = engine
        keys = _block_keys(model)
        self.block_bucket = {key: len(keys) - 1 - j for j, key in enumerate(keys)}  # see transformer_units
        self.root_bucket = len(keys) if len(engine.buckets) > len(keys) else None
        self._pending: dict[int, Handle | None] = {}  # gathered (or gathering) buckets
        self.most_gathered = 0  # the most buckets gathered at once so far (memory accounting)
        self._head_pending = 0  # pipeline: head forwards whose backward has not finished
        engine.reducer.on_bucket_reduced = self.release
        if isinstance(model, StageModule):
            sequences = [[str(i) for i in layers] for layers in model.chunk_layers]
            self._hook_stage_root(model, sequences)
        else:
            sequences = [keys]
            model.register_forward_pre_hook(self._before_model)
            model.register_forward_hook(self._after_model)
        # Prefetch only along the blocks one pass runs in a row (a chunk of a stage).
        self._next: dict[str, str | None] = {}
        self._previous: dict[str, str | None] = {}
        for sequence in sequences:
            for j, key in enumerate(sequence):
                self._next[key] = sequence[j + 1] if j + 1 < len(sequence) else None
                self._previous[key] = sequence[j - 1] if j > 0 else None
        self._first_blocks = [sequence[0] for sequence in sequences if sequence]
        for key in keys:
            block = model.blocks[key] if isinstance(model.blocks, nn.ModuleDict) else model.blocks[int(key)]
            block.register_forward_pre_hook(lambda module, args, key=key: self._before_block(key, args))
            block.register_forward_hook(lambda module, args, output, key=key: self._after_block(key, output))

    # --- gathering and releasing ----------------------------------------------------------
    def _start(self, b: int, async_op: bool) -> None:
        engine = self.engine
        full = engine.full_params[b]
        full.untyped_storage().resize_(full.numel() * full.element_size())
        self._pending[b] = engine.comm.all_gather_into(full, engine.param_shards[b], engine.group,
                                                       async_op=async_op, tag="params")
        self.most_gathered = max(self.most_gathered, len(self._pending))

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

    def gathered(self) -> list[int]:
        """The buckets whose full parameters are resident now (or being gathered)."""
        return sorted(self._pending)

    # --- the dense model's root: gathered for the whole forward and backward ---------------
    def _before_model(self, module: nn.Module, args: tuple) -> None:
        if self.root_bucket is not None:
            self.ensure(self.root_bucket)
        if self._first_blocks:
            self.prefetch(self.block_bucket[self._first_blocks[0]])

    def _after_model(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.root_bucket is not None and not (torch.is_grad_enabled() and output.requires_grad):
            self.release(self.root_bucket)  # evaluation: no backward will come for it

    # --- a pipeline stage's root: per pass (see the module docstring) ---------------------
    def _hook_stage_root(self, stage: StageModule, sequences: Sequence[Sequence[str]]) -> None:
        if self.root_bucket is None:
            return
        if stage.holds_embedding:
            first = sequences[0][0] if sequences and sequences[0] else None
            stage.embed.register_forward_pre_hook(lambda module, args: self._before_embedding(first))
            stage.embed.register_forward_hook(lambda module, args, output: self.release(self.root_bucket))
        if stage.holds_head:
            stage.norm.register_forward_pre_hook(self._before_head)
            stage.lm_head.register_forward_hook(self._after_head)

    def _before_embedding(self, first_block: str | None) -> None:
        self.ensure(self.root_bucket)
        if first_block is not None:
            self.prefetch(self.block_bucket[first_block])

    def _before_head(self, module: nn.Module, args: tuple) -> None:
        self.ensure(self.root_bucket)
        x = args[0]
        if torch.is_grad_enabled() and x.requires_grad:
            # The gradient of the norm's input completes the head's backward.
            x.register_hook(lambda grad: self._head_backward_done())

    def _after_head(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._head_pending += 1  # keep the root until this micro-batch's head backward
            output.register_hook(lambda grad: self.ensure(self.root_bucket))
        elif self._head_pending == 0:
            self.release(self.root_bucket)  # evaluation: no backward will come for it

    def _head_backward_done(self) -> None:
        self._head_pending -= 1
        if self._head_pending == 0:
            self.release(self.root_bucket)

    # --- blocks ----------------------------------------------------------------------------
    def _before_block(self, key: str, args: tuple) -> None:
        self.ensure(self.block_bucket[key])
        following = self._next[key]
        if following is not None:
            self.prefetch(self.block_bucket[following])
        x = args[0]
        if torch.is_grad_enabled() and x.requires_grad:
            # Once the gradient of the block's input is complete, every op of the block that
            # reads its weights has run: the backward is over (accumulating into `.grad` and
            # the W passes of zb need no weights).
            x.register_hook(lambda grad, key=key: self.release(self.block_bucket[key]))

    def _after_block(self, key: str, output: torch.Tensor) -> None:
        self.release(self.block_bucket[key])
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(lambda grad, key=key: self._before_block_backward(key))

    def _before_block_backward(self, key: str) -> None:
        following = self._next[key]
        if following is not None:
            # This output is the following block's input, so its backward is over: let it go
            # before gathering (its own input hook would, but only after this hook has run).
            self.release(self.block_bucket[following])
        self.ensure(self.block_bucket[key])
        previous = self._previous[key]
        if previous is not None:
            self.prefetch(self.block_bucket[previous])
