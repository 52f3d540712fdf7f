"""Export a run's model with Hugging Face Llama parameter names (safetensors + config.json).

plait's rotary embedding already uses the rotate-half convention of Hugging Face's Llama,
so the query and key weights are written as they are, with no permutation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from plait.config import ModelConfig
from plait.errors import ConfigError
from plait.train.trained import load_trained

_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK.match(name)
    if not match or match.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"no Hugging Face name for parameter '{name}'")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_len,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def export_hf(run_dir: Path, output: Path) -> list[Path]:
    """Write `output` (.safetensors) and, beside it, config.json unless one is already there."""
    trained = load_trained(run_dir)
    if trained.cfg.model.n_experts:
        raise ConfigError(f"model.n_experts={trained.cfg.model.n_experts}: plait export writes dense Llama "
                          "models only; an MoE model has no Llama layout (its checkpoint holds it in full)")
    # named_parameters lists a tied weight once (as the embedding), which is what HF expects.
    tensors = {hf_name(n): p.detach().to(torch.float32).contiguous() for n, p in trained.model.named_parameters()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"format": "pt", "source": f"plait step {trained.step}"})
    written = [output]
    config_path = output.parent / "config.json"
    if not config_path.exists():
        config_path.write_text(json.dumps(hf_config(trained.cfg.model), indent=2))
        written.append(config_path)
    return written
