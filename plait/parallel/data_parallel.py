"""Data parallelism: replicated parameters, gradients summed over the data-parallel group.

Gradients live in flat per-bucket buffers (each parameter's `.grad` is a view into one), so
autograd accumulates straight into the buffer that is all-reduced and no copies are made.
Buckets hold parameters in reverse registration order, roughly the order backward
produces their gradients. When the last gradient of a bucket has been accumulated on the
final micro-batch of a step, the bucket's all-reduce is launched asynchronously and runs
while backward continues; `finish_gradient_sync` waits for all of them before the
optimizer step. Buckets are launched strictly in index order so that every rank issues the
same collectives in the same order.

Gradients are summed, not averaged: the loss is already normalised by the global token
count, so the sum over ranks is the gradient of the global mean loss whatever dp is.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from plait.parallel.comm import Comm, Group, Handle


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor
    pending: int = 0
    handle: Handle | None = None
    ready: bool = False


class DataParallel:
    def __init__(self, model: nn.Module, comm: Comm, group: Group, bucket_bytes: int):
        self.model = model
        self.comm = comm
        self.group = group
        self.buckets = self._make_buckets([p for p in model.parameters() if p.requires_grad], bucket_bytes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._sync = True
        self._next_to_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for b in self.buckets for p in b.params]
        self._begin_step()

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[Bucket]:
        buckets: list[Bucket] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        out = []
        for members in buckets:
            dtype, device = members[0].dtype, members[0].device
            buffer = torch.zeros(sum(p.numel() for p in members), dtype=dtype, device=device)
            offset = 0
            for p in members:
                p.grad = buffer[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            out.append(Bucket(params=members, buffer=buffer))
        return out

    def _begin_step(self) -> None:
        for b in self.buckets:
            b.pending, b.handle, b.ready = len(b.params), None, False
        self._next_to_launch = 0

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (non-final micro-batches of gradient accumulation)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.ready = True
            self._launch_ready_buckets()

    def _launch_ready_buckets(self, force: bool = False) -> None:
        while self._next_to_launch < len(self.buckets):
            bucket = self.buckets[self._next_to_launch]
            if not (bucket.ready or force):
                return
            bucket.handle = self.comm.all_reduce(bucket.buffer, self.group, async_op=True, tag="grads")
            self._next_to_launch += 1

    def finish_gradient_sync(self) -> None:
        """Launch buckets whose parameters got no gradient this step, then wait for every all-reduce."""
        self._launch_ready_buckets(force=True)
        for bucket in self.buckets:
            bucket.handle.wait()
        self._begin_step()

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def grad_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
