"""Data parallelism's gradient side: reduce each bucket over the data-parallel group as soon
as backward has produced all of its gradients, overlapping communication with the rest of
backward.

Two ways to hold gradients, chosen by the ZeRO stage:

- resident (plain data parallel and ZeRO-1): a full gradient buffer per bucket lives across
  the micro-batches of a step. When the parameter dtype equals the reduction dtype, each
  `.grad` is a view into it, so autograd accumulates straight into the buffer (no copies).
  Only the last micro-batch communicates: an all-reduce (stage 0) or a reduce-scatter whose
  result lands in this rank's slice of the buffer (stage 1).
- sharded (ZeRO-2 and 3): only this rank's slice of each bucket's gradient is kept. Every
  micro-batch reduce-scatters each bucket as it completes and frees the full gradients,
  trading more traffic under accumulation for 1/dp of the gradient memory.

Buckets are launched strictly in index order so every rank issues the same collectives in
the same order. Gradients are summed, not averaged: the loss is already normalised by the
global token count, so the sum over ranks is the gradient of the global mean loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from plait.comm import Comm, Group, Handle
from plait.parallel.flat import Bucket


class GradientReducer:
    def __init__(
        self, buckets: list[Bucket], comm: Comm, group: Group, *, shard: bool, resident: bool,
        reduce_dtype: torch.dtype, device: torch.device,
        on_bucket_reduced: Callable[[int], None] | None = None,
    ):
        self.buckets, self.comm, self.group = buckets, comm, group
        self.shard, self.resident, self.reduce_dtype = shard, resident, reduce_dtype
        self.on_bucket_reduced = on_bucket_reduced
        self._sync = True
        self._deferred = False
        self._index = {id(p): (b, i) for b, bucket in enumerate(buckets) for i, p in enumerate(bucket.params)}
        self.full: list[torch.Tensor | None] = []  # resident full buffers
        self.shards: list[torch.Tensor | None] = []  # sharded-mode gradient shards
        self._zero_copy: list[bool] = []
        for bucket in buckets:
            zero_copy = resident and all(p.dtype == reduce_dtype for p in bucket.params)
            self._zero_copy.append(zero_copy)
            if resident:
                full = torch.zeros(bucket.padded, dtype=reduce_dtype, device=device)
                if zero_copy:
                    for p, offset in zip(bucket.params, bucket.offsets):
                        p.grad = full[offset:offset + p.numel()].view_as(p)
                self.full.append(full)
                self.shards.append(None)
            else:
                self.full.append(None)
                self.shards.append(torch.zeros(bucket.shard_size, dtype=reduce_dtype, device=device))
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for bucket in buckets for p in bucket.params]
        self._begin()

    def _begin(self) -> None:
        self._pending = [len(b.params) for b in self.buckets]
        self._next = 0
        self._inflight: list[tuple[int, Handle, torch.Tensor | None]] = []

    @contextmanager
    def micro_batch(self, final: bool) -> Iterator[None]:
        """Wrap one micro-batch's backward. Resident gradients are reduced only after the final
        micro-batch of the step; sharded ones after every micro-batch."""
        self._sync = final or not self.resident
        try:
            yield
        finally:
            sync, self._sync = self._sync, True
        if sync:  # not reached when backward raised: no collective after a failure
            self._flush()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Let backward passes accumulate into `.grad` untouched; `flush()` reduces afterwards.

        For a pipeline, whose micro-batches interleave, so no hook can tell the last one.
        """
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def flush(self) -> None:
        """Reduce every bucket now (after `deferred` backward passes)."""
        self._flush()

    def absorb_all(self) -> None:
        """Move every `.grad` into the resident buffers without communicating (a compressed
        reduction then works on the buffers)."""
        for b, bucket in enumerate(self.buckets):
            if not self._zero_copy[b]:
                for i in range(len(bucket.params)):
                    self._absorb(b, i)

    # --- backward hooks ---------------------------------------------------------------
    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        b, i = self._index[id(param)]
        if self._deferred:  # flush() takes the gradients from `.grad` afterwards
            return
        if self.resident and not self._zero_copy[b]:
            self._absorb(b, i)
        if not self._sync:
            return
        self._pending[b] -= 1
        if self._pending[b] == 0:
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets) and (force or self._pending[self._next] == 0):
            self._launch(self._next)
            self._next += 1

    def _absorb(self, b: int, i: int) -> None:
        """Add a parameter's `.grad` (another dtype than the buffer) into its resident bucket."""
        param, offset = self.buckets[b].params[i], self.buckets[b].offsets[i]
        if param.grad is not None:
            self.full[b][offset:offset + param.numel()] += param.grad.flatten()
            param.grad = None

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        if self.resident and not self._zero_copy[b]:
            for i in range(len(bucket.params)):
                self._absorb(b, i)
        if self.resident:
            full, out = self.full[b], None
            if not self.shard:
                handle = self.comm.all_reduce(full, self.group, async_op=True, tag="grads")
            else:
                out = torch.empty(bucket.shard_size, dtype=full.dtype, device=full.device)
                handle = self.comm.reduce_scatter(out, full, self.group, async_op=True, tag="grads")
        else:
            full = torch.zeros(bucket.padded, dtype=self.reduce_dtype, device=self.shards[b].device)
            for p, offset in zip(bucket.params, bucket.offsets):
                if p.grad is not None:
                    full[offset:offset + p.numel()].copy_(p.grad.flatten())
                    p.grad = None
            out = torch.empty(bucket.shard_size, dtype=full.dtype, device=full.device)
            handle = self.comm.reduce_scatter(out, full, self.group, async_op=True, tag="grads")
        self._inflight.append((b, handle, out))
        if self.on_bucket_reduced is not None:
            self.on_bucket_reduced(b)

    def _flush(self) -> None:
        """Launch buckets that got no gradient, wait for every reduction, store the shards."""
        self._launch_ready(force=True)
        for b, handle, out in self._inflight:
            handle.wait()
            if out is None:
                continue
            if self.resident:
                lo, hi = self.buckets[b].shard_range(self.group.rank)
                self.full[b][lo:hi].copy_(out)
            else:
                self.shards[b] += out
        self._begin()

    # --- what the optimizer sees --------------------------------------------------------
    def grad_shard(self, b: int) -> torch.Tensor:
        """This rank's reduced gradient of bucket b (the whole bucket when not sharding)."""
        if not self.resident:
            return self.shards[b]
        if not self.shard:
            return self.full[b]
        lo, hi = self.buckets[b].shard_range(self.group.rank)
        return self.full[b][lo:hi]

    def zero_grad(self) -> None:
        for buffer in self.full + self.shards:
            if buffer is not None:
                buffer.zero_()

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.full + self.shards if t is not None)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
