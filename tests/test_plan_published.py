"""`plait plan` against published and measured runs it was not built from.

- Llama 3 405B (Llama 3 paper, Table 4): tp 8 x pp 16 on 80 GB H100s, 16M-token batches,
  43% MFU at 8,192 GPUs, 41% at 16,384, 38% with cp 16 at 131,072 tokens per sequence. With
  tp, pp, dp (and cp) pinned, the search must find a layout that fits 80 GB, within 15%.
- One H200, plain PyTorch 2.11 (bf16, SDPA, fused AdamW, torch.compile), plait presets:
  llama-1b at micro-batch 8 and 16, gpt2-124m at 32: tokens/s within 10%.
"""

import dataclasses

import pytest

from plait.plan.cli import resolve_model
from plait.plan.cluster import PRESETS as CLUSTERS
from plait.plan.estimate import evaluate
from plait.plan.layouts import Layout, parse_pins
from plait.plan.memory import (_peak_chunks_in_flight, activation_terms, layer_activation_bytes,
                               rank_activation_bytes)
from plait.plan.models import PRESETS
from plait.plan.search import pinned_search

# GPUs, tokens per sequence, sequences per batch, cp, published MFU
LLAMA3_405B = [(8192, 8192, 2048, 1, 0.43), (16384, 8192, 2048, 1, 0.41), (16384, 131072, 128, 16, 0.38)]


@pytest.mark.parametrize("gpus,seq,batch,cp,published", LLAMA3_405B, ids=["8k-gpus", "16k-gpus", "cp16-128k"])
def test_llama3_405b_fits_80gb_and_mfu_within_15_percent(gpus, seq, batch, cp, published):
    model = dataclasses.replace(PRESETS["llama3-405b"], seq_len=seq)
    dp = gpus // (8 * 16 * cp)
    pins = parse_pins(f"tp=8,pp=16,cp={cp},dp={dp},schedule=interleaved,sequence_parallel=true,zero=1")
    result = pinned_search(model, CLUSTERS["h100-sxm"], gpus, batch, pins)
    best = result.best
    assert best is not None and best.fits and best.memory_bytes["total"] <= 80e9
    assert all(getattr(best.layout, k) == v for k, v in pins.items())
    assert abs(best.mfu / published - 1) < 0.15, (best.layout.short(), best.mfu)


# preset, micro-batch, measured tokens/s, measured MFU as the table states it
H200_TABLE = [("llama-1b", 8, 57.4e3, 0.545), ("llama-1b", 16, 60.4e3, 0.573), ("gpt2-124m", 32, 464.5e3, 0.510)]


@pytest.mark.parametrize("preset,micro_batch,tokens_per_s,mfu", H200_TABLE, ids=["1b-mb8", "1b-mb16", "124m-mb32"])
def test_h200_single_gpu_steps_within_10_percent(preset, micro_batch, tokens_per_s, mfu):
    model, _, _ = resolve_model(preset, [])
    estimate = evaluate(model, CLUSTERS["h200"], Layout(micro_batch=micro_batch), micro_batch)
    assert abs(estimate.tokens_per_s_per_gpu / tokens_per_s - 1) < 0.10
    # The table's MFU counts the LM head's matrix in N even when it is tied to the embedding
    # (6 V d more per token for gpt2-124m: 51.0%); plait's trainer counts a tied matrix once.
    head = 6 * model.vocab_size * model.dim if model.tie_embeddings else 0
    table_mfu = estimate.tokens_per_s_per_gpu * (model.model_flops_per_token() + head) / 989.5e12
    assert abs(table_mfu / mfu - 1) < 0.10


def test_fused_swiglu_and_memory_efficient_norm_keep_what_megatron_keeps():
    model = PRESETS["llama3-405b"]  # fused SwiGLU, memory-efficient norm, flash attention
    s, b, h, t, f, kv = 8192, 1, 16384, 8, 53248, 1024
    # norm outputs (the matmul inputs) 2, Q and O 2, K and V 2 kv/h, gate and up 2 f/h; all over t with SP
    expected = 2 * s * b * (2 * h + 2 * h + 2 * kv + 2 * f) / t
    assert layer_activation_bytes(model, b, t, True) == pytest.approx(expected)
    plain = dataclasses.replace(model, memory_efficient_norm=False, fused_swiglu=False, fused_norm=False)
    assert layer_activation_bytes(plain, b, t, True) == pytest.approx(expected + 2 * s * b * (4 * h + 2 * f) / t)
    # selective recompute of a flash-attention core keeps its inputs: nothing saved
    assert layer_activation_bytes(model, b, t, True, "selective") == layer_activation_bytes(model, b, t, True)


def test_chunked_loss_never_holds_a_micro_batchs_fp32_logits():
    model = dataclasses.replace(PRESETS["llama3-8b"], seq_len=8192)
    layout = Layout(micro_batch=4)
    full = activation_terms(model, layout, 1, 2.0, 0)["loss"]
    chunked = activation_terms(dataclasses.replace(model, chunked_loss=True), layout, 1, 2.0, 0)["loss"]
    assert full >= 4 * 4 * 8192 * model.vocab_size
    assert chunked < full / 3


@pytest.mark.parametrize("p,v,m", [(4, 2, 8), (16, 4, 32), (8, 3, 8), (4, 1, 2), (4, 1, 16)])
def test_in_flight_chunks_follow_megatrons_warmup(p, v, m):
    for rank in range(p):
        held = _peak_chunks_in_flight("interleaved" if v > 1 else "1f1b", p, v, m, rank, (1.0,) * v)
        warmup = 2 * (p - rank - 1) + (v - 1) * p if v > 1 else p - rank - 1
        assert held == min(m * v, warmup + 1)


def test_embedding_and_head_ranks_and_the_first_stages_hold_most():
    model = PRESETS["llama3-405b"]
    layout = Layout(tp=8, pp=16, dp=64, schedule="interleaved", virtual_stages=4, sequence_parallel=True, zero=1)
    per_rank = [rank_activation_bytes(model, layout, 32, 2.0, r) for r in range(16)]
    # early ranks hold more micro-batches in flight; the last adds the loss but holds the fewest
    assert max(per_rank[:3]) == max(per_rank) and per_rank[-1] < per_rank[0]
    assert activation_terms(model, layout, 32, 2.0, 15)["loss"] > 0 == activation_terms(model, layout, 32, 2.0, 3)["loss"]
