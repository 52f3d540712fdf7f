"""MFU's two halves: the model FLOPs per token and the device's peak."""

from __future__ import annotations

import pytest
import torch

from plait.config import ModelConfig
from plait.model import count_parameters
from plait.model.llama import Transformer
from plait.train import flops


def test_flops_per_token_reproduces_the_issues_published_mfu():
    # The issue's plain PyTorch figure: a Llama-style 1.36B at 57.4k tokens/s on an H200 is 54.5% MFU.
    cfg = ModelConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632, vocab_size=32000,
                      seq_len=2048, tie_embeddings=False)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        n_params = count_parameters(Transformer(cfg))
    assert 1.36e9 < n_params < 1.37e9
    assert 57.4e3 * flops.flops_per_token(cfg, n_params) / 989.5e12 == pytest.approx(0.545, abs=0.002)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2250e12),
    ("AMD Instinct MI250X", 383e12), ("AMD Instinct MI300X", 1307.4e12),
])
def test_peak_is_looked_up_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == peak


def test_unknown_device_has_no_mfu_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    with pytest.warns(UserWarning, match="no peak FLOP/s known for device 'NVIDIA GeForce RTX 4090'"):
        assert flops.peak_flops(torch.device("cuda", 0)) is None
    assert flops.peak_flops(torch.device("cpu")) is None
