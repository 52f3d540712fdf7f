"""Fused Triton kernels (RMSNorm, SwiGLU, rotary) against their reference paths.

Forward and gradients on awkward shapes in fp32 and bf16, a model with the kernels installed
against the plain one, and one torch.compile(fullgraph=True) through the custom ops. Without
a GPU they run under Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports the kernels); with one, on CUDA. What the interpreter cannot check,
that the kernels compile for the GPU and fit in registers, is checked by compiling them for
sm_90 ahead of time (no GPU needed).

Tolerances: fp32 1e-5 of the largest reference value. bf16 2e-2 of it: the kernels round
once from fp32 where the reference rounds several intermediates to bf16 (each a relative
2**-8), and the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused kernels need triton: pip install -e '.[test]'")

from plait.config import load_config
from plait.kernels import install_fused_kernels, rmsnorm, rotary, swiglu, triton_usable
from plait.kernels.rmsnorm import fused_rms_norm
from plait.kernels.rotary import fused_apply_rotary
from plait.kernels.swiglu import fused_swiglu
from plait.model import build_model
from plait.model.llama import RMSNorm, apply_rotary, rms_norm, rotary_tables
from plait.model.llama import swiglu as reference_swiglu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not triton_usable(DEVICE),
                                reason=f"Triton cannot run on {DEVICE.type} here (CPU needs TRITON_INTERPRET=1)")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Same dtype and shape, and max |difference| within the tolerance times max |expected|."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def run(fn, inputs: list[torch.Tensor], grad_seed: int = 7):
    """fn's output and the gradients of <output, fixed random tensor> for every input."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    return out, torch.autograd.grad(out, inputs, grad)


def test_kernels_are_built_for_this_device():
    # The fused functions fall back to the reference where their kernels cannot run; if
    # TRITON_INTERPRET came too late (after the kernel modules were imported), every
    # comparison below would compare the reference with itself.
    for module in (rmsnorm, swiglu, rotary):
        assert DEVICE.type in module._KERNEL_DEVICES, module.__name__
    x = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    assert "plait_rms_norm" in type(fused_rms_norm(x, torch.ones(16, device=DEVICE), 1e-5).grad_fn).__name__
    assert "plait_swiglu" in type(fused_swiglu(x, x).grad_fn).__name__
    q = torch.randn(1, 3, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = rotary_tables(8, torch.arange(2, device=DEVICE), 10000.0)
    assert "plait_rotary" in type(fused_apply_rotary(q, cos, sin).grad_fn).__name__


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 160), (9, 768)])
def test_rms_norm_matches_reference(shape, dtype, weight_dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE, weight_dtype)
    out, (grad_x, grad_w) = run(lambda a, b: fused_rms_norm(a, b, 1e-5), [x, weight])
    ref, (ref_x, ref_w) = run(lambda a, b: rms_norm(a, b, 1e-5), [x, weight])
    tol = torch.float32 if dtype == weight_dtype == torch.float32 else torch.bfloat16
    assert_matches(out, ref, tol, "output")
    assert_matches(grad_x, ref_x, tol, "grad x")
    assert_matches(grad_w, ref_w, tol, "grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 160), (7, 1000)])
def test_swiglu_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (3 * torch.randn((2, *shape), generator=g)).to(DEVICE, dtype).unbind(0)
    out, (grad_gate, grad_up) = run(fused_swiglu, [gate, up])
    ref, (ref_gate, ref_up) = run(reference_swiglu, [gate, up])
    assert_matches(out, ref, dtype, "output")
    assert_matches(grad_gate, ref_gate, dtype, "grad gate")
    assert_matches(grad_up, ref_up, dtype, "grad up")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, seq, heads, head_dim", [(2, 5, 3, 48), (1, 1, 1, 160), (2, 7, 4, 64)])
def test_rotary_matches_reference_on_transposed_input(batch, seq, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(2)
    # As in Attention.forward: a [batch, seq, heads * head_dim] projection viewed and transposed.
    projection = torch.randn(batch, seq, heads * head_dim, generator=g).to(DEVICE, dtype)
    x = projection.view(batch, seq, heads, head_dim).transpose(1, 2)
    assert not x.is_contiguous() or heads == 1 or seq == 1
    cos, sin = rotary_tables(head_dim, torch.arange(seq, device=DEVICE) + 5, 10000.0)

    def fused(t):  # the transposed input itself, not a contiguous copy of it
        return fused_apply_rotary(t.view(batch, seq, heads, head_dim).transpose(1, 2), cos, sin)

    def reference(t):
        return apply_rotary(t.view(batch, seq, heads, head_dim).transpose(1, 2), cos, sin)

    out, (grad,) = run(fused, [projection])
    ref, (ref_grad,) = run(reference, [projection])
    assert_matches(out, ref, dtype, "output")
    assert_matches(grad, ref_grad, dtype, "grad x")


def test_rotary_backward_takes_a_non_contiguous_gradient():
    x = torch.randn(2, 3, 6, 32, device=DEVICE)
    cos, sin = rotary_tables(32, torch.arange(6, device=DEVICE), 10000.0)
    grad = torch.randn(2, 6, 3, 32, device=DEVICE).transpose(1, 2)  # strides of a transposed view
    fused_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    (fused_grad,) = torch.autograd.grad(fused_apply_rotary(fused_x, cos, sin), fused_x, grad)
    (ref_grad,) = torch.autograd.grad(apply_rotary(ref_x, cos, sin), ref_x, grad)
    assert_matches(fused_grad, ref_grad, torch.float32, "grad x")


def test_model_with_kernels_installed_matches_the_plain_model():
    # Non-power-of-two widths (dim 96, head_dim 24, ffn 160) and an MoE block whose shared
    # expert is a SwiGLU, so every kind of module is swapped.
    cfg = load_config("tiny", ["model.dim=96", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                               "model.ffn_dim=160", "model.seq_len=12", "model.n_experts=4", "model.top_k=2",
                               "model.moe_every=2", "model.n_shared_experts=1"])
    plain, fused = build_model(cfg.model, 3, DEVICE), build_model(cfg.model, 3, DEVICE)
    counts = install_fused_kernels(fused)
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 1 + 1, "rotary": 2}
    assert all(m.norm is fused_rms_norm for m in fused.modules() if isinstance(m, RMSNorm))
    assert all(m.norm is rms_norm for m in plain.modules() if isinstance(m, RMSNorm))  # per instance only
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits = {}
    for name, model in (("plain", plain), ("fused", fused)):
        logits[name] = model(tokens)
        torch.nn.functional.cross_entropy(logits[name].flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    assert_matches(logits["fused"], logits["plain"], torch.float32, "logits")
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert_matches(p.grad, q.grad, torch.float32, f"grad of {name}")


def test_compile_keeps_the_custom_ops_in_one_graph():
    targets = []

    def recording_inductor(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compile_fx(gm, example_inputs)

    def step(x, weight, gate, up, q, cos, sin):
        return (fused_rms_norm(x, weight, 1e-5).sum() + fused_swiglu(gate, up).sum()
                + fused_apply_rotary(q, cos, sin).sum())

    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(3, 24, generator=g), 1 + torch.randn(24, generator=g), torch.randn(3, 40, generator=g),
              torch.randn(3, 40, generator=g), torch.randn(1, 4, 2, 16, generator=g).transpose(1, 2)]
    cos, sin = rotary_tables(16, torch.arange(4), 10000.0)
    inputs = [t.to(DEVICE).requires_grad_() for t in inputs]
    compiled = torch.compile(step, backend=recording_inductor, fullgraph=True)  # a graph break raises
    out = compiled(*inputs, cos.to(DEVICE), sin.to(DEVICE))
    grads = torch.autograd.grad(out, inputs)
    assert any("plait.rms_norm" in t for t in targets) and any("plait.swiglu" in t for t in targets)
    assert any("plait.rotary" in t for t in targets), targets
    ref = step(*inputs, cos.to(DEVICE), sin.to(DEVICE))
    for got, want in zip(grads, torch.autograd.grad(ref, inputs)):
        assert_matches(got, want, torch.float32, "compiled gradient")
    assert_matches(out, ref, torch.float32, "compiled output")


def test_unsupported_inputs_take_the_reference_path():
    # float64 would lose precision in the fp32 kernels; tables that want a gradient would
    # not get one from the op. Both run the reference itself: bit-identical, no custom op.
    x = torch.randn(3, 2, 4, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.ones(8, dtype=torch.float64, device=DEVICE)
    assert torch.equal(fused_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5))
    assert "plait" not in type(fused_swiglu(x, x).grad_fn).__name__
    cos, sin = rotary_tables(8, torch.arange(4, device=DEVICE), 10000.0)
    cos.requires_grad_()
    out = fused_apply_rotary(x.float(), cos, sin)
    assert "plait" not in type(out.grad_fn).__name__
    assert torch.equal(out, apply_rotary(x.float(), cos, sin))



def sm90_resource_usage(workdir: Path) -> list[dict]:
    """Compile every kernel for sm_90 (H200/H100) ahead of time, without a GPU: registers and stack.

    bf16 at the benchmark's shapes (dim 2048 / 768, 16 heads of 128 / 12 of 64) and at the
    largest sizes the fused functions accept (MAX_COLS, MAX_TILE), with the launch's warps.
    Must run where TRITON_INTERPRET is off: triton decorates its own library functions
    (tl.sum...) for the interpreter at import, and the compiler cannot use those.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bf16 = "*bf16"
    rms = {"X": bf16, "W": bf16, "Y": bf16, "GY": bf16, "GX": bf16, "RSTD": "*fp32", "GW_PARTIAL": "*fp32", "eps": "fp32"}
    swiglu_types = {name: bf16 for name in ("GATE", "UP", "OUT", "GRAD", "GRAD_GATE", "GRAD_UP")}
    rotary_types = {"X": bf16, "OUT": bf16, "COS": "*fp32", "SIN": "*fp32"}
    builds = []
    for cols in (768, 2048, rmsnorm.MAX_COLS):
        block = triton.next_power_of_2(cols)
        for kernel in (rmsnorm._rms_norm_forward_kernel, rmsnorm._rms_norm_backward_kernel):
            builds.append((kernel, rms, {"BLOCK": block}, rmsnorm.num_warps_for(block)))
    for kernel in (swiglu._swiglu_forward_kernel, swiglu._swiglu_backward_kernel):
        builds.append((kernel, swiglu_types, {"BLOCK": swiglu.BLOCK}, swiglu.NUM_WARPS))
    for heads, head_dim in ((16, 128), (12, 64), (rotary.MAX_TILE // 64, 128)):
        block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
        for inverse in (False, True):
            builds.append((rotary._rotary_kernel, rotary_types,
                           {"INVERSE": inverse, "BLOCK_H": block_h, "BLOCK_HALF": block_half},
                           rotary.num_warps_for(block_h * block_half)))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for kernel, types, constexprs, num_warps in builds:
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        usage = {}
        if cuobjdump.exists():
            cubin = workdir / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", dump)}
        results.append({"kernel": kernel.fn.__name__, "constexprs": constexprs, "num_warps": num_warps, **usage})
    return results


@pytest.mark.skipif("nvidia" not in __import__("triton.backends", fromlist=["backends"]).backends,
                    reason="this triton build has no NVIDIA backend")
def test_kernels_compile_for_sm90_without_spilling(tmp_path):
    # The interpreter runs kernels as numpy code, so it cannot catch what only the GPU
    # compiler sees: an op its lowering rejects, a loop-carried type change, register
    # spills. This compiles them for the H200's architecture, in a process without the
    # interpreter (see sm90_resource_usage).
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}  # compile afresh
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 14  # 3 widths x 2 RMSNorm kernels, 2 SwiGLU kernels, 3 tiles x 2 rotary directions
    for result in results:
        assert result.get("STACK", 0) == 0 and result.get("LOCAL", 0) == 0, result


if __name__ == "__main__":  # run by the test above, in a fresh process without the interpreter
    print(json.dumps(sm90_resource_usage(Path(sys.argv[1]))))
