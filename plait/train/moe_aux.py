"""The MoE layers' auxiliary losses and load metrics in the training loop.

After each micro-batch's forward, every MoE layer holds its router statistics
(`MoE.last_stats`). `MoEAux.backward` adds this rank's share of the auxiliary losses to the
language-model loss and runs backward; `step_metrics` reports the step's expert load.

Layout invariance. Every term is a share whose sum over the ranks (and the step's
micro-batches) is the loss of the global batch, like the language-model loss:

- z-loss: Σ over this rank's tokens of logsumexp(logits)², divided by the global batch's
  token count: the mean over the global batch.
- load-balancing loss, `train.lbl_scope = global_batch` ("Demons in the Detail", Qwen 2025):
  f_i counts the routed slots of the whole step, all-reduced over every rank that holds
  tokens (dp x cp, and tp under sequence parallelism) and accumulated over the accumulation
  micro-batches (moe_losses.GlobalBatchCounts). f is known only after the step's last
  forward, so the loss is added to the last micro-batch's backward and reaches the earlier
  micro-batches' router probabilities through their graphs, which are kept (retain_graph)
  until then: exact, at the price of holding those graphs and of a second backward pass
  through each earlier micro-batch's layers below its routers. With no accumulation
  (micro-batch = a rank's share of the global batch) nothing is kept and nothing repeated.
- `micro_batch` scope: f_i per forward pass, counted over the ranks that share the
  micro-batch's tokens (cp x tp), then averaged over the global batch's dp x accumulation
  micro-batches (every dp rank runs `accumulation` of them, layout/batch.py, even where their
  rows differ by one; each counts alike). It depends on how the batch is cut into
  micro-batches, by nature.

Both losses are summed over the MoE layers, each times its coefficient (`train.lbl_coef`,
`train.z_loss_coef`). The `loss` metric stays the language-model loss alone.
"""

from __future__ import annotations

import torch

from plait.comm import BOOKKEEPING, Comm
from plait.config import Config
from plait.parallel.folding import ExpertGroups, moe_layers
from plait.parallel.moe_losses import TAG, GlobalBatchCounts, expert_fraction


class MoEAux:
    def __init__(self, model: torch.nn.Module, cfg: Config, groups: ExpertGroups, comm: Comm,
                 tokens_per_step: int, accumulation: int):
        m, t = cfg.model, cfg.train
        self.layers = moe_layers(model)
        self.device = self.layers[0].router.weight.device
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.lbl_coef, self.z_coef, self.scope = t.lbl_coef, t.z_loss_coef, t.lbl_scope
        self.groups, self.comm = groups, comm
        self.tokens_per_step = tokens_per_step
        # In the global batch: every dp rank runs `accumulation` (config.accumulation_steps), none
        # empty, however unevenly the rows are shared out.
        self.micro_batches = accumulation * cfg.parallel.dp
        self.global_counts = [GlobalBatchCounts(self.n_experts, self.top_k, groups.tokens, comm)
                              for _ in self.layers]
        # Retain the step's graphs only when the global-batch loss reaches back into them.
        self.retain = self.lbl_coef > 0 and self.scope == "global_batch" and accumulation > 1
        self._reset()

    def _reset(self) -> None:
        n_layers = len(self.layers)
        self.prob_sums: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # kept with their graphs
        # Local sums over the step, for the metrics (no gradient).
        self.load = torch.zeros(n_layers, self.n_experts, dtype=torch.float64)
        self.prob_total = torch.zeros(n_layers, self.n_experts, dtype=torch.float64)
        self.dropped = torch.zeros(n_layers, dtype=torch.float64)
        self.z_total = torch.zeros(n_layers, dtype=torch.float64)

    def backward(self, lm_loss: torch.Tensor, final: bool) -> None:
        """Backward of one micro-batch's loss plus this rank's auxiliary-loss share."""
        aux = self._aux_share(final)
        total = lm_loss if aux is None else lm_loss + aux
        total.backward(retain_graph=self.retain and not final)
        for layer in self.layers:
            layer.last_stats = None  # read; let its tensors go
        if final:  # the step's graphs and counts are spent
            self.prob_sums = [[] for _ in self.layers]
            for counts in self.global_counts:
                counts.reset()

    def _aux_share(self, final: bool) -> torch.Tensor | None:
        shares = []
        for index, layer in enumerate(self.layers):
            stats = layer.last_stats
            self._record(index, stats)
            if self.z_coef > 0:
                z = torch.logsumexp(stats.logits.float(), dim=-1).pow(2).sum() / self.tokens_per_step
                shares.append(self.z_coef * z)
            if self.lbl_coef > 0:
                lbl = self._lbl_share(index, stats, final)
                if lbl is not None:
                    shares.append(self.lbl_coef * lbl)
        return torch.stack(shares).sum() if shares else None

    def _record(self, index: int, stats) -> None:
        self.load[index] += stats.counts.detach().cpu().double()
        self.prob_total[index] += stats.prob_sum.detach().cpu().double()
        self.dropped[index] += stats.dropped_fraction * stats.n_tokens * self.top_k
        self.z_total[index] += float(torch.logsumexp(stats.logits.detach().float(), dim=-1).pow(2).sum())

    def _lbl_share(self, index: int, stats, final: bool) -> torch.Tensor | None:
        if self.scope == "global_batch":
            counts = self.global_counts[index]
            counts.add(stats.counts)
            self.prob_sums[index].append(stats.prob_sum)
            if not final:
                return None
            return counts.loss(torch.stack(self.prob_sums[index]).sum(dim=0))
        # Micro-batch scope: f over the ranks holding this micro-batch's tokens.
        counts = stats.counts.detach().to(torch.int64).clone()  # on the device: NCCL reduces only there
        self.comm.all_reduce(counts, self.groups.micro_batch, tag=TAG)
        n_tokens = max(int(counts.sum()) // self.top_k, 1)
        f = expert_fraction(counts).to(stats.prob_sum.device)
        return self.n_experts * (f * stats.prob_sum.float()).sum() / n_tokens / self.micro_batches

    def step_metrics(self) -> dict[str, object]:
        """The step's expert load over the global batch (collective over the token holders):
        moe_load (routed slots per expert, per MoE layer, before capacity dropping),
        moe_imbalance (max / mean of that load, per layer), moe_dropped_frac (per layer),
        moe_lbl (global-batch load-balancing loss, mean over layers; 1 is balanced, n_experts
        total collapse) and moe_z_loss (mean over layers)."""
        n_layers = len(self.layers)
        local = torch.cat([self.load.flatten(), self.prob_total.flatten(), self.dropped, self.z_total])
        local = local.to(self.device)  # NCCL reduces device tensors only
        self.comm.all_reduce(local, self.groups.tokens, tag=BOOKKEEPING)
        local = local.cpu()
        sizes = [n_layers * self.n_experts, n_layers * self.n_experts, n_layers, n_layers]
        load, prob_total, dropped, z_total = torch.split(local, sizes)
        load, prob_total = load.view(n_layers, -1), prob_total.view(n_layers, -1)
        slots = load.sum(dim=1).clamp(min=1)
        n_tokens = slots / self.top_k
        lbl = self.n_experts * (load / slots[:, None] * prob_total / n_tokens[:, None]).sum(dim=1)
        self._reset()
        return {
            "moe_load": [[int(round(c)) for c in row] for row in load.tolist()],
            "moe_imbalance": (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-12)).tolist(),
            "moe_dropped_frac": (dropped / slots).tolist(),
            "moe_lbl": float(lbl.mean()),
            "moe_z_loss": float((z_total / n_tokens).mean()),
        }


def build_moe_aux(model: torch.nn.Module, cfg: Config, groups: ExpertGroups | None, comm: Comm,
                  tokens_per_step: int, accumulation: int) -> MoEAux | None:
    """The auxiliary losses of an MoE model; None for a dense one."""
    if groups is None:
        return None
    return MoEAux(model, cfg, groups, comm, tokens_per_step, accumulation)
