"""Activation recomputation: identical numerics in every mode, and the saved-bytes counter
against what each mode should keep (Korthikanti et al. 2022, in fp32 for our blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from plait.config import ModelConfig
from plait.model import build_model
from plait.parallel.recompute import apply_recompute, count_saved_activation_bytes

BATCH, DIM, HEADS, LAYERS, FP32 = 2, 32, 4, 2, 4


def _cfg(seq: int, layers: int = LAYERS) -> ModelConfig:
    return ModelConfig(dim=DIM, n_layers=layers, n_heads=HEADS, n_kv_heads=2, ffn_dim=64, vocab_size=40, seq_len=seq)


def run(mode: str, seq: int = 32, layers: int = LAYERS, math_attention: bool = False):
    """(loss, {name: grad}, activation bytes) of one forward and backward pass."""
    cfg = _cfg(seq, layers)
    model = build_model(cfg, seed=0)
    apply_recompute(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, seq + 1), generator=torch.Generator().manual_seed(0))
    # The math kernel materialises the attention probabilities, as unfused attention does;
    # backward must use the same kernel, since recomputation re-runs the forward there.
    backend = sdpa_kernel(SDPBackend.MATH) if math_attention else torch.enable_grad()
    with backend:
        with count_saved_activation_bytes(model.parameters()) as saved:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved.bytes


def test_recompute_modes_give_identical_loss_and_gradients():
    loss, grads, _ = run("none")
    for mode in ("selective", "full"):
        other_loss, other_grads, _ = run(mode)
        assert torch.equal(loss, other_loss), mode
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=0, atol=1e-7, msg=f"{mode} {name}")


def test_full_recompute_keeps_only_block_inputs():
    outside_blocks = run("none", layers=0)[2]  # embedding, final norm, head and loss
    seq = 32
    block_input = BATCH * seq * DIM * FP32
    rotary_tables = 2 * seq * (DIM // HEADS) * FP32  # cos and sin, inputs of every block, shared
    assert run("full", seq)[2] - outside_blocks == LAYERS * block_input + rotary_tables
    assert run("none", seq)[2] > 10 * run("full", seq)[2] - 10 * outside_blocks


def test_selective_recompute_removes_the_attention_score_terms():
    none_32, selective_32 = run("none", 32, math_attention=True)[2], run("selective", 32, math_attention=True)[2]
    none_64, selective_64 = run("none", 64, math_attention=True)[2], run("selective", 64, math_attention=True)[2]
    # The removed bytes are a·s² terms plus linear ones (GQA's expanded k, v): removed(s) =
    # A·s² + B·s, so the quadratic part at s = 32 is (removed(64) - 2·removed(32)) / 2.
    quadratic = ((none_64 - selective_64) - 2 * (none_32 - selective_32)) // 2
    scores = LAYERS * BATCH * HEADS * 32 * 32 * FP32  # one [b, a, s, s] fp32 tensor per layer
    assert scores <= quadratic <= 5 * scores  # Korthikanti's 5·a·s/h term (in 16-bit units)
    # What selective keeps is linear in seq and does not depend on the attention kernel.
    assert selective_64 - run("none", 64, layers=0)[2] == 2 * (selective_32 - run("none", 32, layers=0)[2])
    assert selective_32 == run("selective", 32)[2]
    # A fused kernel keeps no scores in the first place: only its log-sum-exp per query goes.
    assert run("none", 32)[2] - selective_32 == LAYERS * BATCH * HEADS * 32 * FP32


def test_counter_skips_weights_and_counts_storages_once():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with count_saved_activation_bytes([weight]) as saved:
        y = x @ weight.T  # saves x and a view of the weight
        z = (y * y).sum()  # saves y twice: one storage
    assert saved.bytes == x.numel() * FP32 + y.numel() * FP32
    z.backward()


def test_unknown_mode_and_double_application_are_rejected():
    model = build_model(_cfg(8), seed=0)
    with pytest.raises(ValueError, match="not one of"):
        apply_recompute(model, "partial")
    apply_recompute(model, "selective")
    with pytest.raises(ValueError, match="already"):
        apply_recompute(model, "full")
