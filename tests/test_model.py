"""The plain model: layout-invariant init, attention against a dense reference, export names."""

import math

import torch
import torch.nn.functional as F

from plait.config import ModelConfig
from plait.export import hf_name
from plait.model import build_model
from plait.model.init import init_tensor, parameter_seed
from plait.model.llama import Transformer, apply_rotary, rotary_tables

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50, seq_len=16)


def test_init_depends_only_on_seed_name_and_shape():
    a, b = build_model(CFG, seed=3), build_model(CFG, seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p, init_tensor(3, name, tuple(p.shape), CFG))
    c = build_model(CFG, seed=4)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    # A parameter's stream does not depend on which other parameters exist or their order.
    deeper = build_model(ModelConfig(**{**CFG.__dict__, "n_layers": 3}), seed=3)
    assert torch.equal(deeper.blocks[1].attn.wq.weight, a.blocks[1].attn.wq.weight)
    assert parameter_seed(3, "x", (2, 2)) != parameter_seed(3, "x", (4,))


def test_init_scales():
    model = build_model(ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=512), seed=0)
    assert abs(model.blocks[0].attn.wq.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].mlp.w_down.weight.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert model.lm_head.weight is model.embed.weight


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The same network written densely: explicit KV repetition, explicit causal softmax."""
    cfg = model.cfg
    head_dim = cfg.dim // cfg.n_heads
    cos, sin = rotary_tables(head_dim, torch.arange(tokens.shape[1]), cfg.rope_theta)

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.embed.weight[tokens]
    b, s, _ = x.shape
    mask = torch.full((s, s), float("-inf")).triu(1)
    for blk in model.blocks:
        h = rms(x, blk.attn_norm.weight)
        q = (h @ blk.attn.wq.weight.T).view(b, s, cfg.n_heads, head_dim).transpose(1, 2)
        k = (h @ blk.attn.wk.weight.T).view(b, s, cfg.n_kv_heads, head_dim).transpose(1, 2)
        v = (h @ blk.attn.wv.weight.T).view(b, s, cfg.n_kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask, -1)
        x = x + (att @ v).transpose(1, 2).reshape(b, s, -1) @ blk.attn.wo.weight.T
        h = rms(x, blk.mlp_norm.weight)
        x = x + (F.silu(h @ blk.mlp.w_gate.weight.T) * (h @ blk.mlp.w_up.weight.T)) @ blk.mlp.w_down.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


def test_forward_matches_dense_reference_with_gqa():
    model = build_model(CFG, seed=1)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens), reference_forward(model, tokens), rtol=1e-5, atol=1e-5)


def test_rotary_keeps_norms_and_relative_positions():
    q = torch.randn(1, 1, 8, 16)
    cos, sin = rotary_tables(16, torch.arange(8), 10000.0)
    rotated = apply_rotary(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    # <R_m q, R_n k> depends on m - n only
    k = torch.randn(16)
    qs = apply_rotary(q[..., :1, :].expand(1, 1, 8, 16), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, 8, 16), cos, sin)[0, 0]
    torch.testing.assert_close(qs[3] @ ks[1], qs[5] @ ks[3], rtol=1e-4, atol=1e-5)


def test_every_parameter_has_a_hugging_face_name():
    names = {hf_name(n) for n, _ in build_model(CFG, seed=0).named_parameters()}
    assert "model.layers.1.self_attn.k_proj.weight" in names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied
    untied = build_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}), seed=0)
    assert "lm_head.weight" in {hf_name(n) for n, _ in untied.named_parameters()}
