"""One GPU's training step: plait against a plain PyTorch Llama, same shapes, one process.

For each shape (a Llama-style 1.36B and a GPT-2-124M-like model) and each mode (eager,
torch.compile) it times full training steps of:

  reference  a self-contained plain PyTorch Llama written below: fused qkv and gate/up
             projections, SDPA, bf16 autocast over fp32 weights, full logits and
             F.cross_entropy, fused AdamW; the usual single-GPU recipe;
  plait      plait's own step, as the trainer runs it on one process: the Transformer,
             parallelize() on a world of one (ZeRO engine: bf16 parameters in flat buffers,
             fp32 masters, fused AdamW, gradient clipping) and MicroBatchLoss with every
             compute choice on auto (plait/train/compute.py: fused Triton kernels in
             eager mode, compile scope by depth, chunked LM-head loss on CUDA);
  variants   (--variants) plait with one choice changed, to measure what each is worth:
             kernels, loss path, compile scope, a doubled micro-batch.

Before timing it checks, on each shape's tensors, the chunked loss against F.cross_entropy
(`ce_check`) and each fused Triton kernel against its reference, forward and gradients
(`kernel_check`, with each kernel's time as a ratio to the reference). Figures are medians
of timed steps after warm-up; `first_step_s` includes compilation; MFU = tokens/s x
(6N + 12 L d s) / peak (null off the peak table and on CPU); peak memory is
torch.cuda.max_memory_allocated, reset between runs. The `speedup` lines give each plait
side's tokens/s over the reference's in the same mode, next to the issue's target.

    python benchmarks/gpu_step.py [--shapes llama-1.36b gpt2-124m] [--modes eager compile]
                                  [--variants plait-scope-model ...] [--budget-s 400]
    python benchmarks/gpu_step.py --smoke      # tiny shapes, CPU, fp32, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import Config, ModelConfig, load_config, validate
from plait.kernels import chunked_cross_entropy, triton_usable
from plait.mesh import Mesh, ParallelDims
from plait.model import build_model
from plait.model.llama import apply_rotary, rms_norm, rotary_tables, swiglu
from plait.comm import Comm
from plait.parallel.parallelize import parallelize
from plait.train.compute import MicroBatchLoss, plan_compute
from plait.train.flops import flops_per_token, peak_flops

# name: (model config, micro-batch)
SHAPES = {
    "llama-1.36b": (ModelConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632, vocab_size=32000,
                                seq_len=2048, tie_embeddings=False), 8),
    "gpt2-124m": (ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=50304,
                              seq_len=1024, tie_embeddings=True), 32),
}
# The targets: plait's tokens/s over the reference's, same mode (compiled plait
# against the compiled reference; eager >= compiled reference is a stretch, not listed).
TARGETS = {("llama-1.36b", "compile"): ">= 1.10", ("gpt2-124m", "compile"): ">= 1.0"}
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
@dataclass(frozen=True)
class Variant:
    """One way of running plait: its train.* overrides and the micro-batch multiplier."""

    name: str
    overrides: tuple[str, ...] = ()
    batch_scale: int = 1


# "plait" is plait with every auto left to plait; the others each change one choice, to
# measure what that choice is worth (run when --variants asks and the time budget allows).
VARIANTS = {
    "plait": Variant("plait"),
    "plait-reference-kernels": Variant("plait-reference-kernels", ("train.kernels=reference",)),
    "plait-fused-kernels": Variant("plait-fused-kernels", ("train.kernels=fused",)),
    "plait-full-logits": Variant("plait-full-logits", ("train.chunked_ce=off",)),
    "plait-scope-model": Variant("plait-scope-model", ("train.compile_scope=model",)),
    "plait-scope-blocks": Variant("plait-scope-blocks", ("train.compile_scope=blocks",)),
    "plait-2x-micro-batch": Variant("plait-2x-micro-batch", (), 2),
    "plait-2x-micro-batch-selective": Variant("plait-2x-micro-batch-selective", ("train.recompute=selective",), 2),
}


def plait_config(cfg: ModelConfig, micro_batch: int, device: torch.device, compile_: bool, chunk: int,
                 overrides: tuple[str, ...]) -> Config:
    """A plait Config for one process with this model: bf16 parameters with fp32 masters on
    CUDA (fp32 on CPU), AdamW at the reference's settings, every compute choice on auto."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    base = [f"train.dtype={dtype}", f"train.compile={str(compile_).lower()}", f"train.global_batch={micro_batch}",
            f"train.micro_batch={micro_batch}", f"train.ce_chunk_tokens={chunk}", "optim.lr=1e-4", "optim.min_lr=1e-5",
            "optim.weight_decay=0.1", "optim.warmup_steps=0", f"train.device={device.type}"]
    full = load_config("tiny", base + list(overrides))
    full.model = cfg
    return validate(full, world_size=1)


def build_plait(cfg: ModelConfig, micro_batch: int, device: torch.device, compile_: bool, chunk: int,
                overrides: tuple[str, ...]):
    """plait's own single-process training step: the Transformer, parallelize() on a world of
    one (the ZeRO engine: flat buffers, fp32 masters, fused AdamW), and the trainer's
    MicroBatchLoss with the compute plan (kernels, compile scope, chunked loss)."""
    config = plait_config(cfg, micro_batch, device, compile_, chunk, overrides)
    model = build_model(config.model, config.train.seed, device)
    mesh = Mesh.build(ParallelDims(), rank=0)
    parallel = parallelize(model, config, mesh, Comm(), device)
    plan = plan_compute(config, device)
    loss_sum = MicroBatchLoss(parallel.model, plan, parallel.loss_sum)
    engine, tokens = parallel.engine, micro_batch * cfg.seq_len

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # What Trainer.train_step does for one micro-batch on one process.
        with engine.micro_batch(final=True):
            loss = loss_sum(x, y, None) / tokens
            loss.backward()
        engine.clip_grad_norm(config.optim.grad_clip)
        engine.step(config.optim.lr)
        engine.zero_grad()
        return loss

    return parallel.model, step, plan.describe()


def build_reference(cfg: ModelConfig, device: torch.device, compile_: bool, amp):
    model = RefLlama(cfg).to(device)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp():
            loss = F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten(), reduction="sum") / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step, "reference: autocast bf16, full logits, fused AdamW"


def check_chunked_ce(cfg: ModelConfig, x, y, device, amp, chunk: int) -> dict:
    """plait's chunked loss and grads against F.cross_entropy on the same hidden states."""
    model = build_model(cfg, seed=0, device=device)
    with amp():
        hidden = model.hidden(x).flatten(0, 1).detach()
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
    return {"loss_chunked": lc.item(), "loss_reference": lr.item(),
            "loss_rel_diff": abs(lc.item() - lr.item()) / abs(lr.item()),
            "grad_hidden_rel_diff": rel_diff(hc, hr), "grad_weight_rel_diff": rel_diff(wc, wr)}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_fused_kernels(cfg: ModelConfig, micro_batch: int, device: torch.device) -> dict:
    """Each fused kernel against its reference on this shape's tensors: forward and gradients
    (relative L2 differences), and each one's forward + backward time as a ratio to the reference."""
    from plait.kernels.rmsnorm import fused_rms_norm
    from plait.kernels.rotary import fused_apply_rotary
    from plait.kernels.swiglu import fused_swiglu

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(3)
    rows, head_dim = micro_batch * cfg.seq_len, cfg.dim // cfg.n_heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    cos, sin = rotary_tables(head_dim, torch.arange(cfg.seq_len, device=device), cfg.rope_theta)
    cases = {
        "rms_norm": (fused_rms_norm, rms_norm, [rand(rows, cfg.dim), 1 + 0.1 * rand(cfg.dim)], (cfg.norm_eps,)),
        "swiglu": (fused_swiglu, swiglu, [rand(rows, cfg.ffn_dim), rand(rows, cfg.ffn_dim)], ()),
        # q as the model makes it: [b, s, h, d] viewed as [b, h, s, d] (not contiguous).
        "rotary": (fused_apply_rotary, apply_rotary,
                   [rand(micro_batch, cfg.seq_len, cfg.n_heads, head_dim).transpose(1, 2)], (cos, sin)),
    }
    out = {}
    for name, (fused, reference, tensors, extra) in cases.items():
        results, times = [], []
        probe = reference(*tensors, *extra)  # one upstream gradient for both
        grad = torch.randn(probe.shape, device=device, dtype=probe.dtype, generator=gen)
        for fn in (fused, reference):
            inputs = [t.detach().clone().requires_grad_() for t in tensors]

            def run():
                for t in inputs:
                    t.grad = None
                fn(*inputs, *extra).backward(grad)

            run()
            results.append([fn(*inputs, *extra).detach()] + [t.grad for t in inputs])
            times.append(median_time(run, device, repeats=10))
        row = {f"{i}_rel_diff": rel_diff(f, r) for i, f, r in zip(["out", "grad0", "grad1"], *results)}
        out[name] = {**row, "time_vs_reference": times[0] / times[1]}
    return out


def median_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(side: str, cfg: ModelConfig, micro_batch: int, device: torch.device, compile_: bool, amp,
            warmup: int, steps: int, chunk: int) -> dict:
    """Median step time of one side (the reference or a plait variant), after warm-up steps
    (which compile); `first_step_s` includes the compilation."""
    torch._dynamo.reset()  # each run compiles afresh
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    variant = VARIANTS.get(side)
    micro_batch *= variant.batch_scale if variant else 1
    if variant is None:
        model, step, plan = build_reference(cfg, device, compile_, amp)
    else:
        model, step, plan = build_plait(cfg, micro_batch, device, compile_, chunk, variant.overrides)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = micro_batch * cfg.seq_len
    gen = torch.Generator(device).manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), device=device, generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step(x, y)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_s = statistics.median(times[warmup:])
    peak = peak_flops(device)
    row = {"side": side, "plan": plan, "micro_batch": micro_batch, "parameters": n_params, "step_s": step_s,
           "first_step_s": times[0], "tokens_per_s": tokens / step_s,
           "mfu": tokens / step_s * flops_per_token(cfg, n_params) / peak if peak else None,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "first_loss": losses[0], "last_loss": losses[-1]}
    del model, step
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"], help="default: both (--smoke: eager)")
    parser.add_argument("--sides", nargs="+", default=["reference", "plait"], choices=["reference", *VARIANTS])
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="plait variants measured after the main sides, while the time budget lasts")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (compile happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of plait's LM-head loss")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no variant run after this many seconds (the main sides always run)")
    parser.add_argument("--no-checks", action="store_true", help="skip the kernel and loss checks")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32, 2 steps")
    args = parser.parse_args()
    began = time.perf_counter()

    if args.smoke:
        device, shapes, modes = torch.device("cpu"), SMOKE_SHAPES, args.modes or ["eager"]
        args.warmup, args.steps, args.chunk = 1, 1, 24  # chunks that do not divide the tokens
        amp = contextlib.nullcontext
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on CPU")
        device, shapes, modes = torch.device("cuda"), {k: SHAPES[k] for k in args.shapes}, args.modes or ["eager", "compile"]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    base = {"benchmark": "gpu_step", "chunk": args.chunk, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    references: dict[tuple[str, str], dict] = {}

    def run(shape: str, mode: str, side: str) -> None:
        cfg, micro_batch = shapes[shape]
        info = {**base, "shape": shape, "seq_len": cfg.seq_len, "mode": mode}
        try:
            row = measure(side, cfg, micro_batch, device, mode == "compile", amp, args.warmup, args.steps, args.chunk)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"side": side, "error": f"out of memory: {str(exc).splitlines()[0]}"}
        emit({**info, **row})
        ref = references.setdefault((shape, mode), row) if side == "reference" else references.get((shape, mode), {})
        if side != "reference" and "step_s" in ref and "step_s" in row:
            mem = (row["peak_memory_gb"] / ref["peak_memory_gb"]) if ref["peak_memory_gb"] else None
            # tokens/s, so that a variant with a larger micro-batch compares fairly
            emit({**info, "side": side, "speedup": row["tokens_per_s"] / ref["tokens_per_s"],
                  "memory_ratio": mem, "target": TARGETS.get((shape, mode))})

    for shape, (cfg, micro_batch) in shapes.items():
        if args.no_checks:
            continue
        info = {**base, "shape": shape, "seq_len": cfg.seq_len}
        gen = torch.Generator(device).manual_seed(2)
        data = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), device=device, generator=gen)
        emit({**info, "ce_check": check_chunked_ce(cfg, data[:, :-1], data[:, 1:], device, amp, args.chunk)})
        if triton_usable(device):
            emit({**info, "kernel_check": check_fused_kernels(cfg, micro_batch, device)})
        else:
            emit({**info, "kernel_check": None, "why": f"Triton cannot run on {device.type} here"})
    # The main comparison first, every shape and mode; then the variants while the budget lasts.
    for shape in shapes:
        for mode in modes:
            for side in args.sides:
                run(shape, mode, side)
    for shape in shapes:
        for mode in modes:
            for side in [v for v in args.variants if v not in args.sides]:
                if time.perf_counter() - began > args.budget_s:
                    emit({**base, "shape": shape, "mode": mode, "side": side, "skipped": "time budget spent"})
                    continue
                run(shape, mode, side)
    emit({**base, "elapsed_s": time.perf_counter() - began})


if __name__ == "__main__":
    main()
