"""Memory laws against published numbers.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models": the
per-layer activation formulas of Table 2 and the GiB figures for 22B / 175B / 530B / 1T.
Rajbhandari et al. 2019 (ZeRO): Ψ = 7.5B, Nd = 64 gives 120 / 31.4 / 16.6 / 1.88 GB.
"""

import pytest

from plait.plan.layouts import Layout
from plait.plan.memory import (PRECISIONS, in_flight_layer_stacks, layer_activation_bytes,
                               model_state_bytes, stage_activation_bytes, stage_params)
from plait.plan.models import ModelSpec

GIB = 2**30
SEQ = 2048


def gpt(layers, hidden, heads):
    return ModelSpec(name="gpt", dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                     ffn_dim=4 * hidden, vocab_size=51200, seq_len=SEQ, tie_embeddings=True, mlp="gelu",
                     norm="layernorm", biases=True, learned_positions=True, dropout=True, flash_attention=False)


# name, layers, hidden, heads, tp, pp, virtual stages, micro-batch,
# published GiB: params + optimizer, activations without recompute (tp only), with tp + sp + selective
KORTHIKANTI = [
    ("22B", 48, 6144, 64, 8, 1, 1, 4, 45.56, 59.25, 9.56),
    ("175B", 96, 12288, 96, 8, 8, 3, 1, 45.56, 66.84, 12.35),
    ("530B", 105, 20480, 128, 8, 35, 3, 1, 31.64, 114.02, 23.08),
    ("1T", 128, 25600, 160, 8, 64, 1, 1, 32.96, 131.25, 26.56),
]

# Table 2 of the paper, bytes per layer, written out independently of plait.plan.memory.
VARIANTS = {
    "no parallelism": (dict(tp=1), lambda s, b, h, a, t: s * b * h * (34 + 5 * a * s / h)),
    "tensor parallel": (dict(), lambda s, b, h, a, t: s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),
    "tp + sequence parallel": (dict(sequence_parallel=True), lambda s, b, h, a, t: s * b * h / t * (34 + 5 * a * s / h)),
    "tp + selective": (dict(recompute="selective"), lambda s, b, h, a, t: s * b * h * (10 + 24 / t)),
    "tp + sp + selective": (dict(sequence_parallel=True, recompute="selective"), lambda s, b, h, a, t: 34 * s * b * h / t),
    "full recompute": (dict(recompute="full"), lambda s, b, h, a, t: 2 * s * b * h),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", KORTHIKANTI, ids=[r[0] for r in KORTHIKANTI])
def test_activation_per_layer_matches_korthikanti_table_2(row, variant):
    _, layers, hidden, heads, tp, _, _, micro_batch, *_ = row
    kwargs, formula = VARIANTS[variant]
    kwargs = {"tp": tp, **kwargs}
    ours = layer_activation_bytes(gpt(layers, hidden, heads), micro_batch, **kwargs)
    expected = formula(SEQ, micro_batch, hidden, heads, kwargs["tp"])
    assert ours == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("row", KORTHIKANTI, ids=[r[0] for r in KORTHIKANTI])
def test_first_stage_activation_gib_match_the_paper(row):
    _, layers, hidden, heads, tp, pp, virtual, micro_batch, _, no_recompute, sp_selective = row
    model = gpt(layers, hidden, heads)
    schedule = "interleaved" if virtual > 1 else "1f1b"
    micro_batches = max(pp, 1) * 8
    for extra, published in ((dict(), no_recompute), (dict(sequence_parallel=True, recompute="selective"), sp_selective)):
        layout = Layout(tp=tp, pp=pp, micro_batch=micro_batch, schedule=schedule, virtual_stages=virtual, **extra)
        per_layer = layer_activation_bytes(model, micro_batch, tp, layout.sequence_parallel, layout.recompute)
        # The paper's figures count the transformer layers only (no embedding / output terms).
        layers_held = layers / pp * in_flight_layer_stacks(layout, micro_batches)
        assert per_layer * layers_held / GIB == pytest.approx(published, rel=0.05)
        # The full first-stage figure adds the embedding-dropout mask (and, at pp = 1, the head): small.
        total = stage_activation_bytes(model, layout, micro_batches, 2.0, "first")
        assert per_layer * layers_held <= total < per_layer * layers_held * 1.25


@pytest.mark.parametrize("row", KORTHIKANTI, ids=[r[0] for r in KORTHIKANTI])
def test_params_and_optimizer_gib_match_the_paper(row):
    """The paper's 18 bytes per parameter (fp16 weights, fp32 grads, fp32 master + Adam m, v)."""
    _, layers, hidden, heads, tp, pp, virtual, *_ = row
    published = row[8]
    layout = Layout(tp=tp, pp=pp, virtual_stages=virtual, schedule="interleaved" if virtual > 1 else "1f1b")
    params = stage_params(gpt(layers, hidden, heads), layout, "mid" if pp > 1 else "first")
    states = model_state_bytes(params, 1, 0, PRECISIONS["megatron"])
    assert sum(states.values()) / GIB == pytest.approx(published, rel=0.05)


@pytest.mark.parametrize("zero,published_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example(zero, published_gb):
    """ZeRO (Rajbhandari et al. 2019), Figure 1: Ψ = 7.5B, Nd = 64, mixed-precision Adam."""
    states = model_state_bytes(7.5e9, 64, zero, PRECISIONS["bf16"])
    assert sum(states.values()) / 1e9 == pytest.approx(published_gb, rel=0.02)


def test_zero_stages_shard_what_they_should():
    s = {z: model_state_bytes(1e9, 8, z, PRECISIONS["bf16"]) for z in range(4)}
    assert s[1]["optimizer"] == s[0]["optimizer"] / 8 and s[1]["grads"] == s[0]["grads"]
    assert s[2]["grads"] == s[0]["grads"] / 8 and s[2]["params"] == s[0]["params"]
    assert s[3]["params"] == s[0]["params"] / 8


def test_in_flight_micro_batches_by_schedule():
    assert in_flight_layer_stacks(Layout(pp=4, schedule="1f1b"), 32) == 4
    assert in_flight_layer_stacks(Layout(pp=4, schedule="1f1b"), 2) == 2
    assert in_flight_layer_stacks(Layout(pp=4, schedule="gpipe"), 32) == 32
    assert in_flight_layer_stacks(Layout(pp=4, schedule="interleaved", virtual_stages=2), 32) == pytest.approx(4 * (1 + 3 / 8))
