"""The training loop, top to bottom: process setup, mesh, data, model, data parallelism,
optimizer, resume, then steps with evaluation, metrics and checkpoints.

Modes built on the loop (resilience, elastic membership) plug in through hooks (hooks.py);
with none, the trainer runs plain training.

Layout invariance is built in here: every rank computes the same global batch from
(seed, step) and takes its rows; the loss of each micro-batch is a sum over tokens divided
by the *global* token count, and gradients are summed over ranks, so the update is that of
the mean loss over the global batch whatever dp and gradient accumulation are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plait import config as config_mod
from plait import errors
from plait.comm import BOOKKEEPING, CHECKPOINT, Comm
from plait.config import Config, accumulation_steps
from plait.data import PreparedData, ensure_prepared, eval_starts, get_batch, load_data, make_sampler
from plait.lowcomm import training as lowcomm
from plait.mesh import Mesh, ParallelDims
from plait.model import build_model, count_parameters
from plait.parallel.parallelize import parallelize
from plait.parallel.recompute import count_saved_activation_bytes
from plait.train import checkpoint as ckpt
from plait.train.async_writer import AsyncCheckpointer, Written
from plait.train.compute import MicroBatchLoss, plan_compute
from plait.train.flops import flops_per_token, peak_flops
from plait.train.hooks import HookChain, TrainingHooks
from plait.train.metrics import Progress, RunLog
from plait.train.lr_schedule import lr_at
from plait.train.moe_aux import build_moe_aux
from plait.train.resume import (
    SHARDED,
    TrainState,
    check_compatible,
    choose_checkpoint,
    read_state,
    restore_state,
    small_files,
)
from plait.train.rundir import write_marker, write_text_atomic
from plait.train.runtime import Runtime, init_runtime, peak_memory_bytes
from plait.train.sample import generate
from plait.train.trained import load_trained
from plait.train.sharded import load_pieces, stored_tensors, write_sharded_checkpoint
from plait.trace import COLLECTIVE, TraceRecorder, trace_file_name


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per step run in this call
    val_loss: float | None = None
    sample: str | None = None
    final_step: int = 0


class Trainer:
    """One rank's training run: `start` (resume), `fit` (the loop), `finish`, `close`.

    `hooks` are the modes plugged into the loop (hooks.py), called in the order given."""

    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime, hooks: Sequence[TrainingHooks] = ()):
        self.cfg, self.run_dir, self.rt = cfg, run_dir, runtime
        config_mod.validate(cfg, runtime.world_size)
        self.comm = Comm()
        self.mesh = Mesh.build(
            ParallelDims(dp=cfg.parallel.dp, tp=cfg.parallel.tp, cp=cfg.parallel.cp, pp=cfg.parallel.pp),
            runtime.rank, timeout_s=cfg.parallel.timeout_s,
        )
        self.data = self._load_data()
        self.model = build_model(cfg.model, cfg.train.seed, runtime.device)
        self.n_params = count_parameters(self.model)  # of the dense model, before any sharding
        self.parallel = parallelize(self.model, cfg, self.mesh, self.comm, runtime.device)
        self.model = self.parallel.model  # under pipeline parallelism: this rank's stage only
        self.engine = self.parallel.engine
        self.lowcomm = lowcomm.build(cfg, self.model, self.engine, self.comm, self.mesh)
        # Kernels, compile scope and loss path (compute.py); the plan is reported at start.
        self.compute = plan_compute(cfg, runtime.device)
        self.loss_sum = MicroBatchLoss(self.model, self.compute, self.parallel.loss_sum)
        self.sampler = make_sampler(self.data, cfg.model.seq_len, cfg.train.global_batch, cfg.train.seed)
        self.val_starts = eval_starts(len(self.data.val), cfg.model.seq_len, cfg.train.eval_batches * cfg.train.global_batch)
        self.flops_per_token = flops_per_token(cfg.model, self.n_params)
        self.peak = peak_flops(runtime.device)
        # Micro-batches per step, the same on every dp rank even where their shares of the
        # global batch differ by a row (layout/batch.py).
        self.accum = accumulation_steps(cfg)
        self.tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        # MoE models: router auxiliary losses and expert-load metrics (None when dense).
        self.moe = build_moe_aux(self.model, cfg, self.parallel.expert_groups, self.comm,
                                 self.tokens_per_step, self.accum)
        # The loss's denominator: the global batch's tokens, or under local SGD a worker's share.
        self.workers = lowcomm.loss_workers(cfg)
        self.loss_tokens = self.tokens_per_step // self.workers
        self.log = RunLog(run_dir, enabled=runtime.is_main, tensorboard=cfg.log.tensorboard)
        self.trace = TraceRecorder(runtime.rank, enabled=cfg.log.trace)
        if cfg.log.trace:
            self.comm.observers.append(self._trace_collective)
            if self.parallel.runner is not None:
                self.parallel.runner.trace = self.trace
        self.checkpointer = self._checkpoint_writer()  # None: checkpoints are written synchronously
        self.state = TrainState()
        self.started = False  # set once the resume is accepted and the run directory may be written
        self.warned_not_finite = False
        self.hooks = HookChain(hooks)
        self.hooks.attach(self)

    # --- setup ----------------------------------------------------------------------------
    def _load_data(self) -> PreparedData:
        # One process builds a missing cache (tokeniser training, token files) while the others
        # wait on its file lock (data/dataset.py), not in a collective: no timeout runs out however
        # long it takes. The barrier then only lines the ranks up.
        ensure_prepared(self.cfg.data, self.cfg.model.vocab_size)
        self.comm.barrier(self.mesh.world)
        return load_data(self.cfg.data, self.cfg.model.vocab_size, self.cfg.model.seq_len)

    def start(self) -> None:
        """Resume from the newest valid checkpoint if there is one, then write the resolved config.

        Nothing in the run directory changes until the resume is accepted: a refused one (another
        model, another tokenizer, resume=never beside checkpoints) leaves it byte for byte as it was.
        """
        chosen, source = None, "disk"
        if self.rt.is_main:
            try:
                path, rejected = choose_checkpoint(self.cfg, self.run_dir)
                path, rejected, source = self.hooks.choose_resume(path, rejected, "disk" if path else "scratch")
                warnings = check_compatible(path, self.cfg, self.data.tokenizer.to_json()) if path else []
                chosen = ("ok", str(path) if path else None, [(str(p), why) for p, why in rejected], warnings)
            except Exception as exc:  # every rank must hear about it, or the others would hang
                chosen = ("error", f"{type(exc).__name__}", str(exc), [])
        chosen = self.comm.broadcast_object(chosen, 0, self.mesh.world)
        if chosen[0] == "error":
            raise getattr(errors, chosen[1], errors.CheckpointError)(chosen[2])
        _, path, rejected, warnings = chosen
        if path is not None:
            self.restore(self._read_checkpoint(self.hooks.locate(Path(path))), f"checkpoint {path}")
        # Accepted: from here on the run directory is written.
        self.started = True
        if self.rt.is_main:
            # A write that a crash or SIGKILL cut short never committed: its temporary folder goes.
            ckpt.remove_leftovers(self.run_dir / "checkpoints")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.run_dir)
            write_text_atomic(self.run_dir / "config.toml", config_mod.to_toml(self.cfg))
        for bad, why in rejected:
            self.log.event("checkpoint_corrupt", path=bad, reason=why)
            self.say(f"warning: checkpoint {bad} is unusable ({why}); falling back to the previous one")
        for warning in warnings:
            self.log.event("warning", message=warning)
            self.say(f"warning: {warning}")
        # Rows past the resumed step (all of them on a fresh start) belong to an attempt that
        # did not reach its next checkpoint: they are redone.
        dropped = self.log.truncate_metrics(self.state.step)
        if path is not None:
            self.log.event("resumed", checkpoint=path, step=self.state.step, dropped_metric_rows=dropped)
            self.say(f"resumed from {path} at step {self.state.step}")
        self.hooks.resumed(self, dropped, source)
        self.log.event(
            "start", name=self.cfg.name, world_size=self.rt.world_size, layout=self.mesh.describe(),
            parameters=self.n_params, device=str(self.rt.device), data=self.data.description,
            step=self.state.step, steps=self.cfg.train.steps, compute=self.compute.describe(),
        )
        self.say(
            f"plait: {self.cfg.name}, {self.n_params / 1e6:.2f}M parameters, {self.mesh.describe()} "
            f"on {self.rt.device.type}, accumulation {self.accum}; {self.data.description}"
        )
        self.say(f"compute: {self.compute.describe()}")

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """The files a resume from checkpoint `path` loads, with each rank's local state if any."""
        files = read_state(path)
        if self.lowcomm is None:
            return files
        if (path / lowcomm.LOCAL_LAYOUT_FILE).exists():  # each rank reads its own file alone
            layout = ckpt.read_file(path, lowcomm.LOCAL_LAYOUT_FILE)["layout"]
            mine = lowcomm.local_state_file(self.rt.rank)
            files[lowcomm.LOCAL_STATE_FILE] = {
                "layout": layout, "ranks": {self.rt.rank: ckpt.read_file(path, mine)} if (path / mine).exists() else {}}
        elif (path / lowcomm.LOCAL_STATE_FILE).exists():  # every rank's state in one file (older checkpoints)
            files[lowcomm.LOCAL_STATE_FILE] = ckpt.read_file(path, lowcomm.LOCAL_STATE_FILE)
        return files

    def restore(self, files: dict[str, Any], name: str) -> None:
        """Load a saved state into this trainer, whatever layout wrote it: a checkpoint's files,
        or the same files kept in memory (`state_files`). `name` names the state in errors."""
        self._checkpoint_written(wait=True)  # a checkpoint still being written is committed first
        self.state = restore_state(files, self._load_weights, self.rt.rank, name)
        if self.lowcomm is not None:
            lowcomm.restore_local_state(self.lowcomm, files.get(lowcomm.LOCAL_STATE_FILE), self.mesh.describe(),
                                        self.rt.rank, name)

    def _load_weights(self, files: dict[str, Any]) -> None:
        """This rank's part of the model and optimizer: its own pieces of a sharded checkpoint
        (collective), or its slices of the full tensors of a whole-state one."""
        if SHARDED not in files:
            self.parallel.load_full_state(files["model.pt"], files["optimizer.pt"])
            return
        path = files[SHARDED]
        try:
            stored = {key: (tuple(entry.size), entry.properties.dtype)
                      for key, entry in stored_tensors(path).items()}
            pieces, finish = self.parallel.load_targets(stored)
            load_pieces(path, pieces, self.mesh.world.process_group if self.mesh.world.size > 1 else None)
        except errors.CheckpointError as exc:
            raise errors.CheckpointError(f"checkpoint {path}: {exc}") from None
        finish()

    def _warn_once_if_not_finite(self, step: int, loss: float) -> None:
        """Say it (once per run) when the loss turns NaN or infinite; the JSON files record null."""
        if math.isfinite(loss) or self.warned_not_finite:
            return
        self.warned_not_finite = True
        message = (f"the training loss is {loss} at step {step} (metrics.jsonl records null); "
                   "a learning rate too high (optim.lr) or bad data are the usual causes")
        self.log.event("warning", message=message, step=step)
        self.say(f"warning: {message}")

    def _trace_collective(self, record) -> None:
        if record.op in ("send", "recv"):  # the pipeline runner traces its own messages
            return
        end = self.trace.now_us()
        start = end - (record.left - record.entered) * 1e6
        self.trace.add(f"{record.op} {record.group}", COLLECTIVE, start, end,
                       seq=record.seq, bytes=record.bytes_sent, tag=record.tag)

    def say(self, text: str) -> None:
        """Print on rank 0 only."""
        if self.rt.is_main:
            print(text, flush=True)

    # --- one optimizer step ---------------------------------------------------------------
    def _micro_batches(self, starts: np.ndarray) -> list[np.ndarray]:
        """This rank's rows of the step's global batch, cut into `self.accum` micro-batches.

        Any dp serves any global batch (plait/layout/batch.py): the dp ranks take the rows in
        order, as evenly as possible (the first global_batch % dp one row more), and every rank
        cuts its rows into the same number of micro-batches, sizes differing by at most one,
        since ZeRO-3 and the pipeline run collectives in each. Validation guarantees none is
        empty. Where micro_batch x dp divides the batch this is the equal split, row for row.
        """
        mine = np.array_split(starts, self.mesh.dp.size)[self.mesh.dp.rank]
        return np.array_split(mine, self.accum)

    def _batch(self, tokens: np.ndarray, starts: np.ndarray):
        inputs, targets = (t.to(self.rt.device, non_blocking=True)
                           for t in get_batch(tokens, starts, self.cfg.model.seq_len))
        return self.parallel.local_batch(inputs, targets)

    def train_step(self, step: int) -> tuple[torch.Tensor, float, float, int]:
        """Forward and backward over this rank's micro-batches, gradient sync, clip, update.

        Also returns the bytes the first micro-batch saved for backward (activation_bytes).
        """
        lr = lr_at(step, self.cfg.optim, self.cfg.train)
        micro_batches = self._micro_batches(self.sampler.global_batch_starts(step))
        if self.parallel.runner is not None:
            batches = [self._batch(self.data.train, rows) for rows in micro_batches]
            local_loss = self.parallel.pipeline_step(batches, self.loss_tokens)
            activation_bytes = None  # not measured through the pipeline schedule yet
        else:
            local_loss, activation_bytes = self._micro_batch_steps(micro_batches)
        with self.trace.span("optimizer"):
            grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)
            self.engine.step(lr)
            self.engine.zero_grad()
        if self.lowcomm is not None:
            with self.trace.span("outer_sync"):
                self.lowcomm.after_step(step)
        return local_loss, grad_norm, lr, activation_bytes

    def _micro_batch_steps(self, micro_batches: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        local_loss = torch.zeros((), device=self.rt.device)
        activation_bytes = 0
        for index, rows in enumerate(micro_batches):
            inputs, targets, positions = self._batch(self.data.train, rows)
            with self.engine.micro_batch(final=index == len(micro_batches) - 1):
                with count_saved_activation_bytes(self.model.parameters()) if index == 0 else nullcontext() as saved:
                    with self.trace.span("forward", microbatch=index):
                        loss = self.loss_sum(inputs, targets, positions) / self.loss_tokens
                if index == 0:
                    activation_bytes = saved.bytes
                with self.trace.span("backward", microbatch=index):
                    if self.moe is not None:  # adds the router losses' share
                        self.moe.backward(loss, final=index == len(micro_batches) - 1)
                    else:
                        loss.backward()
            local_loss += loss.detach()
        return local_loss, activation_bytes

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over the fixed validation windows, shared out over the dp ranks."""
        # Every window once, shared as evenly as the dp size allows (the mean is then the same
        # on any layout), in the same number of forwards on every rank (ZeRO-3 gathers in each).
        dp = self.mesh.dp.size
        windows = len(self.val_starts)
        starts = self.val_starts if windows >= dp else np.resize(self.val_starts, dp)  # a window for each
        mine = np.array_split(starts, dp)[self.mesh.dp.rank]
        fewest = len(starts) // dp
        forwards = min(fewest, -(-(-(-len(starts) // dp)) // self.cfg.train.micro_batch))
        totals = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for chunk in np.array_split(mine, forwards):
            inputs, targets, positions = self._batch(self.data.val, chunk)
            if self.parallel.runner is None:
                totals[0] += self.loss_sum(inputs, targets, positions).double()
                totals[1] += targets.numel()
                continue
            logits = self.parallel.forward(inputs, positions)
            if logits is not None:  # None on pipeline stages before the last
                totals[0] += self.parallel.loss_sum(logits, targets).double()
                totals[1] += targets.numel()
        # Over every rank: tensor-parallel peers count the same tokens, which scales the sum
        # and the count alike and leaves the mean as it is.
        self.comm.all_reduce(totals, self.mesh.world, tag=BOOKKEEPING)
        return float(totals[0] / totals[1])

    def _gather_step_stats(self, local_loss: torch.Tensor, activation_bytes: int | None) -> dict[str, float | int]:
        """Global loss and the largest state, activations, memory and traffic of any rank."""
        local = torch.tensor(
            [float(local_loss), self.engine.state_bytes(), -1 if activation_bytes is None else activation_bytes,
             peak_memory_bytes(self.rt.device),
             self.comm.take_bytes()], dtype=torch.float64, device=self.rt.device,
        )
        gathered = torch.empty(self.mesh.world.size * local.numel(), dtype=torch.float64, device=self.rt.device)
        self.comm.all_gather_into(gathered, local, self.mesh.world, tag=BOOKKEEPING)
        rows = gathered.view(self.mesh.world.size, -1)
        # dp and cp ranks hold different tokens' losses; tensor-parallel peers hold the same one.
        biggest = rows[:, 1:].max(dim=0).values.tolist()
        stats = {"loss": float(rows[:, 0].sum()) / self.mesh.tp.size / self.workers, "state_bytes": int(biggest[0]),
                 "activation_bytes": int(biggest[1]) if biggest[1] >= 0 else None,
                 "peak_mem_bytes": int(biggest[2]), "comm_bytes": int(biggest[3])}
        if self.parallel.runner is not None:
            stats["pp_bubble"] = self.parallel.pp_bubble()
        return stats

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(final_step=self.state.step)
        progress = Progress(cfg.train.steps, self.state.step, cfg.log.progress, cfg.log.every, self.rt.is_main)
        last_saved = self.state.step if self.state.step else None
        try:
            for step in range(self.state.step + 1, cfg.train.steps + 1):
                self.hooks.begin_step(step)
                started = time.perf_counter()
                local_loss, grad_norm, lr, activation_bytes = self.train_step(step)
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize(self.rt.device)
                step_time = time.perf_counter() - started
                stats = self._gather_step_stats(local_loss, activation_bytes)
                loss = stats.pop("loss")
                self.state.step, self.state.tokens = step, self.state.tokens + self.tokens_per_step
                tokens_per_s = self.tokens_per_step / step_time
                row = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": self.state.tokens, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
                    "mfu": (tokens_per_s * self.flops_per_token / (self.peak * self.rt.world_size)
                            if self.peak else None),
                    **stats,
                    **(self.moe.step_metrics() if self.moe is not None else {}),
                }
                if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                    self.hooks.phase("eval")
                    row["val_loss"] = result.val_loss = self.evaluate()
                    self.hooks.phase("step")
                    self.log.event("evaluation", step=step, val_loss=row["val_loss"])
                self.log.metrics(row)
                self._warn_once_if_not_finite(step, loss)
                result.losses.append(loss)
                progress.update(step, loss, tokens_per_s, row.get("val_loss"))
                if step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    self.hooks.phase("checkpoint")
                    self.save_checkpoint()
                    self.hooks.phase("step")
                    last_saved = step
                self._checkpoint_written(wait=False)  # logs a background write once it is committed
                self.hooks.end_step(self, step, step_time)
            self.hooks.phase("finish")  # the last checkpoint, the sample: longer than a step
            if last_saved != self.state.step:
                self.save_checkpoint()
            self._checkpoint_written(wait=True)  # the run ends with its last checkpoint committed
        finally:
            progress.close()
            if self.cfg.log.trace:
                self.trace.write(self.run_dir / trace_file_name(self.rt.rank))
        result.final_step = self.state.step
        return result

    def state_files(self) -> dict:
        """The whole layout-free state on every rank (collective over the world): the model and
        optimizer gathered, and the small files. Elastic mode's in-memory replica only."""
        files = self.small_files()
        params, optim = self.parallel.full_state()
        return {"model.pt": params, "optimizer.pt": optim, **files}

    def small_files(self) -> dict[str, Any]:
        """A checkpoint's files besides the model and optimizer, written by rank 0 (collective:
        the RNG states are gathered from every rank)."""
        rng_states = self.comm.all_gather_object(torch.get_rng_state(), self.mesh.world, tag=CHECKPOINT)
        files = small_files(self.state, self.cfg, rng_states, self.data.tokenizer.to_json(), self.mesh.describe())
        if self.lowcomm is not None:
            files[lowcomm.LOCAL_LAYOUT_FILE] = {"layout": self.mesh.describe(), "world_size": self.rt.world_size}
        return files

    def own_files(self) -> dict[str, Any]:
        """The files of a checkpoint this rank writes alone: its local-SGD or compression state."""
        if self.lowcomm is None:
            return {}
        return {lowcomm.local_state_file(self.rt.rank): self.lowcomm.state_dict()}

    def save_checkpoint(self) -> None:
        """Every rank writes its own pieces of the model and optimizer (sharded.py); rank 0 adds
        the small files and commits (collective). Synchronous: returns once the checkpoint is on
        disk. Asynchronous (`self.checkpointer`): returns once this rank's pieces are copied to
        host memory; the previous checkpoint is waited for first, and its failure raised here."""
        root = self.run_dir / "checkpoints"
        self._checkpoint_written(wait=True)  # at most one in flight
        files = self.small_files()
        mine = files if self.rt.is_main else {}
        if self.checkpointer is not None:
            self.checkpointer.start(root, self.state.step, self.parallel.state_pieces(), mine,
                                    self.cfg.checkpoint.keep)
            return
        started = time.perf_counter()
        path = write_sharded_checkpoint(root, self.state.step, self.parallel.state_pieces(), mine, self.comm,
                                        self.mesh.world, self.own_files())
        pruned = [p.name for p in ckpt.prune(root, self.cfg.checkpoint.keep)] if self.rt.is_main else []
        self._log_saved(Written(self.state.step, path, pruned, time.perf_counter() - started))

    def _checkpoint_writer(self) -> AsyncCheckpointer | None:
        """The background writer, where checkpoint.async_save asks for it and it is safe: with
        several processes. It gets a gloo group of its own, made here (collective: every rank
        decides alike, from the config). Checkpoints are written synchronously instead by
        - a single process: plait's one-process runs are the small ones, whose writes take
          milliseconds, and they (and their tests) count on a checkpoint being committed when
          the step that saved it ends;
        - local SGD and compressed gradients: each rank's per-worker state (its own file) is
          written from the live state, outside the pieces and their staging."""
        if not self.cfg.checkpoint.async_save or self.rt.world_size == 1 or self.lowcomm is not None:
            return None
        return AsyncCheckpointer.create(self.rt.world_size, self.rt.rank, self.cfg.parallel.timeout_s)

    def _checkpoint_written(self, wait: bool) -> None:
        """Log the checkpoint the background writer has committed, if any. With `wait`, wait for
        the one in flight first and raise its failure here: the same error on every rank (a
        full disk: CollectiveOSError), as a synchronous save raises it."""
        written = self.checkpointer.finished(wait) if self.checkpointer is not None else None
        if written is None:
            return
        if written.error is not None:
            raise written.error
        self._log_saved(written)

    def _log_saved(self, written: Written) -> None:
        self.log.event("checkpoint_saved", step=written.step, path=str(written.path), pruned=written.pruned,
                       seconds=round(written.seconds, 4), background=written.background)

    def sample(self, prompt: str, n_tokens: int) -> str | None:
        """Text from the checkpoint of the final step, on rank 0 alone, read tensor by tensor
        into one dense model as `plait sample RUN_DIR` does: nothing is gathered over the job,
        and no other rank holds more than its own pieces (all ranks call it)."""
        self._checkpoint_written(wait=True)  # fit saved the final step; a background write is committed
        if not self.rt.is_main:
            return None
        trained = load_trained(self.run_dir)
        return generate(trained.model.to(self.rt.device), self.data.tokenizer, prompt, n_tokens,
                        self.cfg.model.seq_len, seed=self.cfg.train.seed, device=self.rt.device)

    def finish(self, result: TrainResult) -> None:
        """After `fit`: the `finished` event, then the sample train.sample_tokens asks for, printed
        (collective: all ranks call it)."""
        self.log.event("finished", step=result.final_step, val_loss=result.val_loss)
        if self.cfg.train.sample_tokens:
            result.sample = self.sample(DEFAULT_PROMPT, self.cfg.train.sample_tokens)
            self.say(f"\n--- sample after {result.final_step} steps ---\n{result.sample}\n---")

    def close(self) -> None:
        """Release the run: a checkpoint still being written is committed first (fit has waited
        for it already unless it was left by an exception, which is what goes on being raised)."""
        try:
            self._checkpoint_written(wait=True)
        except Exception as exc:  # noqa: BLE001 - the exception that left fit is the one reported
            with suppress(OSError):  # the full disk may refuse this line too
                self.log.event("checkpoint_failed", error_type=type(exc).__name__,
                               message=str(exc).splitlines()[0] if str(exc) else "")
        finally:
            self.hooks.close(finished=self.state.step >= self.cfg.train.steps)
            self.log.close()


DEFAULT_PROMPT = "\n"


def train(cfg: Config, run_dir: Path, hooks: Sequence[TrainingHooks] = ()) -> TrainResult:
    """Run (or resume) training in this process as one rank of the job; print a sample at the end.
    `hooks`: the modes plugged into the loop (plait.resilience builds those of `plait train`)."""
    runtime = init_runtime(cfg)
    trainer = Trainer(cfg, Path(run_dir), runtime, hooks)
    try:
        trainer.start()
        if trainer.state.step >= cfg.train.steps:
            trainer.say(f"already at step {trainer.state.step} of {cfg.train.steps}: nothing to train")
        result = trainer.fit()
        trainer.finish(result)
        return result
    except Exception as exc:
        if trainer.started:  # a refused start leaves the run directory as it was
            try:
                trainer.log.event("error", error_type=type(exc).__name__,
                                  message=str(exc).splitlines()[0] if str(exc) else "")
            except OSError:
                pass  # the full disk that ended the run refuses this line too; the error itself goes on
        raise
    finally:
        trainer.close()
