"""How a rank turns a micro-batch into its summed loss: which kernels run, what is compiled,
and whether the LM head and the loss run in chunks of tokens.

Three config keys, each with an `auto` that is resolved here once and reported at start:

- `train.kernels`: RMSNorm, SwiGLU and rotary embedding as fused Triton kernels
  (plait.kernels) or as the model's plain PyTorch functions. auto: fused on CUDA in eager
  mode. Under torch.compile auto keeps the reference functions, because Inductor fuses them
  itself and can fold them into their neighbours (the residual add before a norm), which an
  opaque custom op would prevent; `benchmarks/gpu_step.py --kernels` measures both.
- `train.compile_scope`: `model` compiles the whole forward (and the full-logits loss) as
  one graph, `blocks` compiles each transformer block on its own; identical blocks then
  share one compiled graph, so compile time does not grow with depth, at the price of no
  fusion across block boundaries. auto: `blocks` from AUTO_BLOCKS_FROM_LAYERS layers up,
  `model` below (measured with `benchmarks/compile_scope.py`; figures in the README).
- `train.chunked_ce`: the LM head and cross-entropy through
  plait.kernels.chunked_cross_entropy, `train.ce_chunk_tokens` tokens at a time, so the fp32
  logits of a whole micro-batch never exist. auto: on for CUDA, where those logits are the
  largest activation (2.1 GB for 8 x 2048 tokens of a 32k vocabulary), off on CPU. It needs
  the LM head on this rank whole: tp = 1, pp = 1 and ZeRO < 3 (whose hooks gather the head
  only when the model's own forward runs).

Every choice changes rounding only: each fused or chunked piece is tested against its
reference path (tests/test_kernels.py, tests/test_chunked_ce.py, tests/test_compute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.config import Config
from plait.errors import ConfigError
from plait.kernels import chunked_cross_entropy, install_fused_kernels, triton_usable

# From this depth up, `compile_scope = auto` compiles block by block (see the module docstring).
AUTO_BLOCKS_FROM_LAYERS = 16


@dataclass(frozen=True)
class ComputePlan:
    kernels: str  # "reference" | "fused"
    compile_scope: str | None  # "model" | "blocks"; None: eager
    chunked_ce: bool
    ce_chunk_tokens: int

    def describe(self) -> str:
        compiled = f"compiled ({self.compile_scope})" if self.compile_scope else "eager"
        loss = f"chunked loss ({self.ce_chunk_tokens} tokens)" if self.chunked_ce else "full-logits loss"
        return f"{compiled}, {self.kernels} kernels, {loss}"


def plan_compute(cfg: Config, device: torch.device) -> ComputePlan:
    """Resolve the `auto`s of train.kernels, train.compile_scope and train.chunked_ce."""
    t, p = cfg.train, cfg.parallel
    kernels = t.kernels
    if kernels == "auto":
        kernels = "fused" if device.type == "cuda" and not t.compile and triton_usable(device) else "reference"
    elif kernels == "fused" and not triton_usable(device):
        raise ConfigError(f"train.kernels=fused needs Triton on a CUDA device (this rank runs on {device.type}); "
                          "use train.kernels=reference or auto")
    scope = None
    if t.compile:
        scope = t.compile_scope
        if scope == "auto":
            scope = "blocks" if cfg.model.n_layers >= AUTO_BLOCKS_FROM_LAYERS else "model"
    whole_head = p.tp == 1 and p.pp == 1 and p.zero < 3
    chunked = t.chunked_ce == "on" or (t.chunked_ce == "auto" and device.type == "cuda" and whole_head)
    return ComputePlan(kernels, scope, chunked, t.ce_chunk_tokens)


class MicroBatchLoss:
    """The summed fp32 loss of this rank's tokens, computed the way the plan says.

    Built after parallelisation (tensor parallelism swaps norms, context parallelism swaps
    the attention core), so the kernels go into the modules that actually run. Compiled, the
    full-logits loss is compiled with the model (scope `model`) or with the LM head (scope
    `blocks`), so that Inductor fuses the fp32 upcast and log-softmax of the logits; the
    chunked loss stays eager: its chunks are large matrix multiplies already.
    """

    def __init__(self, model: nn.Module, plan: ComputePlan, full_logits_loss):
        self.model, self.plan, self.full_logits_loss = model, plan, full_logits_loss
        if plan.kernels == "fused":
            install_fused_kernels(model)
        self.hidden = getattr(model, "hidden", None)
        if plan.chunked_ce and self.hidden is None:
            raise ConfigError("train.chunked_ce=on needs the whole model on this rank (parallel.pp=1)")
        self._loss = self._chunked if plan.chunked_ce else self._full
        self._head_loss = self._plain_head_loss
        if plan.compile_scope == "blocks":
            for block in model.blocks:
                block.compile()
            if not plan.chunked_ce:
                self._loss, self._head_loss = self._blockwise, torch.compile(self._plain_head_loss)
        elif plan.compile_scope == "model":
            if plan.chunked_ce:
                self.hidden = torch.compile(self.hidden)
            else:
                self._loss = torch.compile(self._full)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self._loss(inputs, targets, positions)

    def _full(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.full_logits_loss(self.model(inputs, positions), targets)

    def _blockwise(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self._head_loss(self.hidden(inputs, positions), targets)

    def _plain_head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.full_logits_loss(self.model.lm_head(hidden), targets)

    def _chunked(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        hidden = self.hidden(inputs, positions).flatten(0, 1)
        return chunked_cross_entropy(hidden, self.model.lm_head.weight, targets.flatten(), self.plan.ce_chunk_tokens)
