"""Data parallelism with ZeRO sharding (stages 0-3) and mixed precision: one engine that owns
the parameters' flat buffers, the gradient reducer, the fp32 master weights and AdamW.

Parameters are placed in flat buckets (flat.py); rank r owns slice r of each bucket:

- stage 0: nothing is sharded; gradients are all-reduced; every rank updates everything.
- stage 1: optimizer state and master weights are kept for the owned slices only; gradients
  are reduce-scattered once per step and the updated slices all-gathered back.
- stage 2: as stage 1, and only the owned gradient slices are kept (data_parallel.py).
- stage 3: as stage 2, and parameters are stored as slices too; zero3.py gathers each
  block's parameters just before they are used and frees them afterwards.

In fp32 the model's own parameter storage is the master copy (no duplicate). In bf16 the
model holds bf16 parameters and the owned slices have an fp32 master copy, so per-parameter
bytes follow the ZeRO paper: 2 + 2 + 12 split by stage. With `offload=optimizer` on a GPU
the master slices and AdamW state live in pinned host memory and the step runs on the CPU.

AdamW runs on "segments": the part of each parameter inside the owned slice, a view into
the master buffer, so weight decay can still be applied to matrices only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from plait.comm import CHECKPOINT, Comm, Group
from plait.config import OptimConfig
from plait.parallel.data_parallel import GradientReducer
from plait.parallel.flat import Bucket, make_buckets
from plait.parallel.optimizer import ELEMENTWISE_STATE, build_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ZeroEngine:
    def __init__(
        self, model: nn.Module, comm: Comm, group: Group, optim: OptimConfig, *, stage: int,
        dtype: str, reduce_dtype: str, bucket_bytes: int, device: torch.device, offload: bool = False,
        units: list[list[str]] | None = None, tp_group: Group | None = None,
        pp_group: Group | None = None, norm_exclude: frozenset[str] = frozenset(),
    ):
        self.model, self.comm, self.group, self.stage = model, comm, group, stage
        self.tp_group, self.pp_group = tp_group, pp_group
        self.device = device
        self.compute_dtype = DTYPES[dtype]
        shards = group.size if stage >= 1 else 1
        self.owner = group.rank if stage >= 1 else 0
        named = list(model.named_parameters())  # a tied weight appears once
        if stage == 3:
            if units is None:
                raise ValueError("ZeRO-3 needs the model's units (which parameters are gathered together)")
            by_name = dict(named)
            order = [(n, by_name[n]) for unit in units for n in unit]
            self.buckets = make_buckets(order, bucket_bytes=2**62, shards=shards,
                                        boundaries={unit[0] for unit in units})
        else:
            # Reverse registration order is roughly the order backward produces gradients.
            self.buckets = make_buckets(list(reversed(named)), bucket_bytes, shards)
        self.full_params = [self._flatten(bucket) for bucket in self.buckets]
        self.param_shards = None
        if stage == 3:
            self.param_shards = [full[slice(*b.shard_range(self.owner))].clone()
                                 for b, full in zip(self.buckets, self.full_params)]
            for full in self.full_params:
                full.untyped_storage().resize_(0)  # zero3.py refills it when the block runs
        self.opt_device = torch.device("cpu") if offload else device
        self.masters = [self._master(b) for b in range(len(self.buckets))]
        self.reducer = GradientReducer(
            self.buckets, comm, group, shard=stage >= 1, resident=stage <= 1,
            reduce_dtype=DTYPES[reduce_dtype], device=device,
        )
        self.segments: list[list[tuple[nn.Parameter, int, int]]] = []  # (segment, shard_start, length)
        decay, no_decay = [], []
        for b, bucket in enumerate(self.buckets):
            segs = []
            for seg in bucket.segments(self.owner):
                view = self.masters[b][seg.shard_start:seg.shard_start + seg.length]
                whole = bucket.params[seg.param_index]
                if seg.length == whole.numel():  # unsharded: keep the shape (GaLore needs matrices)
                    view = view.view(whole.shape)
                param = nn.Parameter(view)
                segs.append((param, seg.shard_start, seg.length))
                # Norm weights (1-D) are not decayed: decay would pull their scale towards zero.
                (decay if bucket.params[seg.param_index].ndim >= 2 else no_decay).append(param)
            self.segments.append(segs)
        # How each owned gradient element enters the global norm: 1 counted once, 2 a
        # tensor-parallel shard (its squares are summed over tp), 0 left out (a second copy,
        # such as the tied embedding on the last pipeline stage).
        self.norm_kinds = None
        if (tp_group is not None and tp_group.size > 1) or norm_exclude:
            self.norm_kinds = []
            for bucket in self.buckets:
                kinds = torch.ones(bucket.shard_size, dtype=torch.int8, device=device)
                for seg in bucket.segments(self.owner):
                    name = bucket.names[seg.param_index]
                    kind = 0 if name in norm_exclude else 2 if hasattr(bucket.params[seg.param_index], "_tp_dim") else 1
                    kinds[seg.shard_start:seg.shard_start + seg.length] = kind
                self.norm_kinds.append(kinds)
        self.optim_name = optim.name
        # Per-element state keys, gathered and sliced like the parameters; None: GaLore's
        # whole-matrix state, kept as it is (it only runs unsharded, see optimizer.py).
        self.moment_keys = ELEMENTWISE_STATE.get(optim.name)
        self.optimizer = build_optimizer(optim, decay, no_decay, self.opt_device)
        self.grad_sync = None  # a compressed replacement for the gradient all-reduce (lowcomm)

    # --- layout -------------------------------------------------------------------------
    def _flatten(self, bucket: Bucket) -> torch.Tensor:
        """Move a bucket's parameters into one flat buffer (compute dtype); they become views."""
        full = torch.zeros(bucket.padded, dtype=self.compute_dtype, device=self.device)
        with torch.no_grad():
            for p, offset in zip(bucket.params, bucket.offsets):
                view = full[offset:offset + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
        return full

    def _owned_params(self, b: int) -> torch.Tensor:
        if self.param_shards is not None:
            return self.param_shards[b]
        return self.full_params[b][slice(*self.buckets[b].shard_range(self.owner))]

    def _master(self, b: int) -> torch.Tensor:
        owned = self._owned_params(b)
        if owned.dtype == torch.float32 and self.opt_device == owned.device:
            return owned  # fp32 on the optimizer's device: the parameters are the master copy
        master = owned.detach().to(self.opt_device, torch.float32, copy=True)
        return master.pin_memory() if self.opt_device.type == "cpu" and self.device.type == "cuda" else master

    def _master_is_param(self, b: int) -> bool:
        return self.masters[b].data_ptr() == self._owned_params(b).data_ptr()

    # --- a training step ------------------------------------------------------------------
    @contextmanager
    def micro_batch(self, final: bool) -> Iterator[None]:
        if self.grad_sync is not None:  # accumulate untouched; reduce once, compressed
            with self.reducer.deferred():
                yield
            if final:
                self.sync_gradients()
            return
        with self.reducer.micro_batch(final):
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Backward passes whose gradients `sync_gradients` reduces afterwards (pipelines)."""
        with self.reducer.deferred():
            yield

    def sync_gradients(self) -> None:
        if self.grad_sync is None:
            self.reducer.flush()
            return
        self.reducer.absorb_all()
        self.grad_sync(self.named_grads())

    def named_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient as a view into the resident buffers (stage 0 only)."""
        return {name: self.reducer.full[b][offset:offset + p.numel()].view(p.shape)
                for b, bucket in enumerate(self.buckets)
                for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets)}

    def load_local(self, masters: list[torch.Tensor], optimizer_state: dict) -> None:
        """Restore this rank's own masters and optimizer state (saved by the same layout)."""
        with torch.no_grad():
            for mine, saved in zip(self.masters, masters, strict=True):
                mine.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        self._publish()

    def reload_masters(self) -> None:
        """Take the masters from the model's parameters after something outside the optimizer
        (an outer local-SGD step) rewrote them."""
        with torch.no_grad():
            for b in range(len(self.buckets)):
                if not self._master_is_param(b):
                    self.masters[b].copy_(self._owned_params(b))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradient (before clipping); scales gradients if it exceeds max_norm."""
        squares = torch.zeros(2, dtype=torch.float32, device=self.device)  # [tp-sharded, counted once]
        for b in range(len(self.buckets)):
            grad_squares = self.reducer.grad_shard(b).float().pow(2)
            if self.norm_kinds is not None:
                squares[0] += grad_squares[self.norm_kinds[b] == 2].sum()
                squares[1] += grad_squares[self.norm_kinds[b] == 1].sum()
            else:
                squares[1] += grad_squares.sum()
        if self.stage >= 1:  # disjoint slices: their squares add up to the whole
            self.comm.all_reduce(squares, self.group, tag="grad_norm")
        if self.tp_group is not None and self.tp_group.size > 1:
            sharded = squares[:1].clone()
            self.comm.all_reduce(sharded, self.tp_group, tag="grad_norm")
            squares[0] = sharded[0]
        if self.pp_group is not None and self.pp_group.size > 1:  # stages hold disjoint parameters
            self.comm.all_reduce(squares, self.pp_group, tag="grad_norm")
        norm = float(squares.sum().sqrt())
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for b in range(len(self.buckets)):
                    self.reducer.grad_shard(b).mul_(coef)
        return norm

    def step(self, lr: float) -> None:
        for b, segs in enumerate(self.segments):
            grad = self.reducer.grad_shard(b)
            for param, start, length in segs:
                param.grad = grad[start:start + length].view(param.shape).to(self.opt_device, torch.float32)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for segs in self.segments:
            for param, _, _ in segs:
                param.grad = None
        self._publish()

    def publish_masters(self) -> None:
        """After the masters were written from outside (a checkpoint's pieces): the parameters follow."""
        with torch.no_grad():
            self._publish()

    def _publish(self) -> None:
        """Copy updated masters into the model's parameters and, for stages 1-2, gather them."""
        handles = []
        for b in range(len(self.buckets)):
            owned = self._owned_params(b)
            if not self._master_is_param(b):
                owned.copy_(self.masters[b])
            if self.stage in (1, 2):
                handles.append(self.comm.all_gather_into(self.full_params[b], owned.clone(), self.group,
                                                         async_op=True, tag="params"))
        for handle in handles:
            handle.wait()

    def zero_grad(self) -> None:
        self.reducer.zero_grad()

    def state_bytes(self) -> int:
        """Bytes of parameters + gradients + master weights + optimizer moments on this rank."""
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        params = sum(map(size, self.param_shards if self.param_shards is not None else self.full_params))
        masters = sum(size(self.masters[b]) for b in range(len(self.buckets)) if not self._master_is_param(b))
        moments = sum(size(v) for state in self.optimizer.state.values() for v in state.values()
                      if torch.is_tensor(v) and v.ndim > 0)
        return params + self.reducer.grad_bytes() + masters + moments

    # --- checkpoints: full tensors by parameter name, whatever the layout ---------------------
    def _gather_flat(self, b: int, shard: torch.Tensor) -> torch.Tensor:
        bucket = self.buckets[b]
        if bucket.shards == 1:
            return shard.detach().float().cpu()
        full = torch.empty(bucket.padded, dtype=torch.float32, device=self.device)
        self.comm.all_gather_into(full, shard.detach().to(self.device, torch.float32), self.group, tag=CHECKPOINT)
        return full.cpu()

    def _moment_shard(self, b: int, key: str) -> torch.Tensor:
        shard = torch.zeros(self.buckets[b].shard_size, dtype=torch.float32, device=self.opt_device)
        for param, start, length in self.segments[b]:
            value = self.optimizer.state.get(param, {}).get(key)
            if value is not None:
                shard[start:start + length] = value.flatten()
        return shard

    def _has_optimizer_state(self) -> bool:
        return any(state for state in self.optimizer.state.values())

    def full_state(self, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Every parameter (fp32) and, unless `optimizer=False`, its AdamW state, in full on
        every rank (collective)."""
        params, optim = {}, {}
        with_state = optimizer and self._has_optimizer_state()
        step = next((s["step"] for s in self.optimizer.state.values() if "step" in s), None)
        for b, bucket in enumerate(self.buckets):
            flat = self._gather_flat(b, self.masters[b])
            moments = ({k: self._gather_flat(b, self._moment_shard(b, k)) for k in self.moment_keys}
                       if with_state and self.moment_keys is not None else {})
            for i, (name, p, offset) in enumerate(zip(bucket.names, bucket.params, bucket.offsets)):
                params[name] = flat[offset:offset + p.numel()].view(p.shape).clone()
                if not with_state:
                    continue
                if self.moment_keys is None:  # whole-matrix state, unsharded: as it is
                    optim[name] = _cpu_copy(self.optimizer.state.get(self._segment_of(b, i), {}))
                    continue
                optim[name] = {k: v[offset:offset + p.numel()].view(p.shape).clone() for k, v in moments.items()}
                if step is not None:
                    optim[name]["step"] = torch.as_tensor(step).detach().cpu().clone()
        return params, optim

    def _segment_of(self, b: int, param_index: int) -> nn.Parameter:
        """The optimizer parameter of a whole (unsharded) parameter of bucket b."""
        for seg, (param, _, _) in zip(self.buckets[b].segments(self.owner), self.segments[b]):
            if seg.param_index == param_index:
                return param
        raise KeyError(self.buckets[b].names[param_index])

    def load_full_state(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take this rank's slices of full, name-keyed tensors (written by any layout)."""
        names = {n for bucket in self.buckets for n in bucket.names}
        if set(params) != names:
            raise KeyError(f"parameters differ from the model: {sorted(set(params) ^ names)[:3]}")
        if optim and set(optim) != names:
            raise KeyError(f"optimizer state is missing parameters: {sorted(names - set(optim))[:3]}")
        with torch.no_grad():
            for b, bucket in enumerate(self.buckets):
                lo, hi = bucket.shard_range(self.owner)
                flat = self._flat_from(bucket, params)
                if self.param_shards is None:
                    self.full_params[b].copy_(flat.to(self.device, self.compute_dtype))
                else:
                    self.param_shards[b].copy_(flat[lo:hi].to(self.device, self.compute_dtype))
                if not self._master_is_param(b):
                    self.masters[b].copy_(flat[lo:hi])
                if not optim:
                    continue
                if self.moment_keys is None:
                    for i, name in enumerate(bucket.names):
                        self.optimizer.state[self._segment_of(b, i)] = _device_copy(optim[name], self.opt_device)
                    continue
                keys = [k for k in self.moment_keys if all(k in optim[n] for n in bucket.names)]
                moments = {k: self._flat_from(bucket, {n: optim[n][k] for n in bucket.names})[lo:hi] for k in keys}
                step = optim[bucket.names[0]].get("step")
                for param, start, length in self.segments[b]:
                    state = {k: v[start:start + length].view(param.shape).to(self.opt_device).clone()
                             for k, v in moments.items()}
                    if step is not None:
                        state["step"] = step.clone().to(self.opt_device if step.ndim else "cpu")
                    self.optimizer.state[param] = state

    @staticmethod
    def _flat_from(bucket: Bucket, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.zeros(bucket.padded, dtype=torch.float32)
        for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
            flat[offset:offset + p.numel()] = tensors[name].flatten().float()
        return flat


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _device_copy(state: dict, device: torch.device) -> dict:
    return {k: v.to(device).clone() if torch.is_tensor(v) else v for k, v in state.items()}
