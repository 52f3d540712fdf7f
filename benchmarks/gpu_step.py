"""One GPU's training step: plait against a plain PyTorch Llama, same shapes, one process.

For each shape (a Llama-style 1.36B and a GPT-2-124M-like model) and each mode (eager,
torch.compile) it times full training steps (forward, backward, fused AdamW, bf16
autocast) of two models of identical architecture and size:

  reference  a self-contained plain PyTorch Llama written below (SDPA, full logits and
             F.cross_entropy), the usual single-GPU recipe;
  plait      plait's Transformer from build_model, its loss through the chunked LM-head
             cross-entropy (plait.kernels) on the final hidden states.

Before timing, plait's chunked loss and its gradients are checked against F.cross_entropy
on the full logits of the same batch (the `ce_check` line). Figures are medians of timed
steps after warm-up; MFU = tokens/s x (6N + 12 L d s) / peak (null off the peak table,
and on CPU); peak memory is torch.cuda.max_memory_allocated, reset between runs. The
`ratio` lines give plait / reference step time (below 1: plait is faster) and peak memory.

    python benchmarks/gpu_step.py [--shapes llama-1.36b gpt2-124m] [--modes eager compile]
    python benchmarks/gpu_step.py --smoke      # tiny shapes, CPU, fp32, eager, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import ModelConfig
from plait.kernels import chunked_cross_entropy
from plait.model import build_model
from plait.model.llama import rotary_tables
from plait.train.flops import flops_per_token, peak_flops

# name: (model config, micro-batch)
SHAPES = {
    "llama-1.36b": (ModelConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632, vocab_size=32000,
                                seq_len=2048, tie_embeddings=False), 8),
    "gpt2-124m": (ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=50304,
                              seq_len=1024, tie_embeddings=True), 32),
}
SMOKE_SHAPES = {
    "smoke-untied": (ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160, vocab_size=300,
                                 seq_len=32, tie_embeddings=False), 2),
    "smoke-tied": (ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, vocab_size=200,
                               seq_len=16, tie_embeddings=True), 3),
}


# ----------------------------------------------------------------------------- reference
class RefBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class RefLlama(nn.Module):
    """Plain Llama: fused qkv and gate/up projections, RoPE, SDPA, RMSNorm, full logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.seq_len).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------- plait
class PlaitTrunk(nn.Module):
    """plait's model up to the final norm: hidden states [b, s, d], no LM head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rotary_tables(m.cfg.dim // m.cfg.n_heads, positions, m.cfg.rope_theta)
        x = m.embed(tokens)
        for block in m.blocks:
            x = block(x, cos, sin)
        return m.norm(x)


def build(side: str, cfg: ModelConfig, device: torch.device, compile_: bool, chunk: int):
    """(module whose parameters are trained, loss(tokens, targets) -> summed fp32 loss)."""
    if side == "reference":
        model = RefLlama(cfg).to(device)
        forward = torch.compile(model) if compile_ else model

        def loss_fn(x, y):
            return F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten(), reduction="sum")
    else:
        model = build_model(cfg, seed=0, device=device)
        trunk = PlaitTrunk(model)
        trunk = torch.compile(trunk) if compile_ else trunk

        def loss_fn(x, y):
            hidden = trunk(x).flatten(0, 1)
            if torch.is_autocast_enabled(device.type):
                hidden = hidden.to(torch.get_autocast_dtype(device.type))
            return chunked_cross_entropy(hidden, model.lm_head.weight, y.flatten(), chunk)
    return model, loss_fn


def check_chunked_ce(cfg: ModelConfig, x, y, device, amp, chunk: int) -> dict:
    """plait's chunked loss and grads against F.cross_entropy on the same hidden states."""
    model = build_model(cfg, seed=0, device=device)
    with amp():
        hidden = PlaitTrunk(model)(x).flatten(0, 1).detach()
    hidden = hidden.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    weight = model.lm_head.weight.detach()
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss = chunked_cross_entropy(h, w, y.flatten(), chunk)
        else:
            loss = F.cross_entropy((h @ w.to(h.dtype).T).float(), y.flatten(), reduction="sum")
        loss.backward()
        results.append((loss.detach(), h.grad.float(), w.grad.float()))
    (lc, hc, wc), (lr, hr, wr) = results
    del model
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    return {"loss_chunked": lc.item(), "loss_reference": lr.item(),
            "loss_rel_diff": abs(lc.item() - lr.item()) / abs(lr.item()),
            "grad_hidden_rel_diff": rel(hc, hr), "grad_weight_rel_diff": rel(wc, wr)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(side: str, cfg: ModelConfig, micro_batch: int, device: torch.device, compile_: bool, amp,
            warmup: int, steps: int, chunk: int) -> dict:
    torch._dynamo.reset()  # each run compiles afresh
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model, loss_fn = build(side, cfg, device, compile_, chunk)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    tokens = micro_batch * cfg.seq_len
    gen = torch.Generator(device).manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), device=device, generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with amp():
            loss = loss_fn(x, y) / tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_s = statistics.median(times)
    peak = peak_flops(device)
    row = {"side": side, "parameters": n_params, "step_s": step_s, "tokens_per_s": tokens / step_s,
           "mfu": tokens / step_s * flops_per_token(cfg, n_params) / peak if peak else None,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "first_loss": losses[0], "last_loss": losses[-1]}
    del model, opt, loss_fn
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"], help="default: both (--smoke: eager)")
    parser.add_argument("--sides", nargs="+", default=["reference", "plait"], choices=["reference", "plait"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (compile happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of plait's LM-head loss")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32, eager, 2 steps")
    args = parser.parse_args()

    if args.smoke:
        device, shapes, modes = torch.device("cpu"), SMOKE_SHAPES, args.modes or ["eager"]
        args.warmup, args.steps, args.chunk = 1, 1, 24  # chunks that do not divide the tokens
        amp = contextlib.nullcontext
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on CPU")
        device, shapes, modes = torch.device("cuda"), {k: SHAPES[k] for k in args.shapes}, args.modes or ["eager", "compile"]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    base = {"benchmark": "gpu_step", "chunk": args.chunk, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    for shape, (cfg, micro_batch) in shapes.items():
        info = {**base, "shape": shape, "micro_batch": micro_batch, "seq_len": cfg.seq_len}
        gen = torch.Generator(device).manual_seed(2)
        data = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), device=device, generator=gen)
        print(json.dumps({**info, "ce_check": check_chunked_ce(cfg, data[:, :-1], data[:, 1:], device, amp, args.chunk)}),
              flush=True)
        for mode in modes:
            rows = {}
            for side in args.sides:
                try:
                    rows[side] = measure(side, cfg, micro_batch, device, mode == "compile", amp,
                                         args.warmup, args.steps, args.chunk)
                except torch.cuda.OutOfMemoryError as exc:
                    rows[side] = {"side": side, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                print(json.dumps({**info, "mode": mode, **rows[side]}), flush=True)
            ref, ours = rows.get("reference", {}), rows.get("plait", {})
            if "step_s" in ref and "step_s" in ours:
                mem = (ours["peak_memory_gb"] / ref["peak_memory_gb"]) if ref["peak_memory_gb"] else None
                print(json.dumps({**info, "mode": mode, "ratio": ours["step_s"] / ref["step_s"],
                                  "memory_ratio": mem, "target": "ratio <= 1.0"}), flush=True)


if __name__ == "__main__":
    main()
