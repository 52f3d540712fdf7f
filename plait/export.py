"""Export a run's model with Hugging Face Llama parameter names (safetensors + config.json).

plait's rotary embedding already uses the rotate-half convention of Hugging Face's Llama,
so the query and key weights are written as they are, with no permutation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save

from plait.config import ModelConfig
from plait.data.tokenfile import atomic_write, atomic_write_text
from plait.errors import ConfigError, PlaitError
from plait.outputs import check_output_file
from plait.train.trained import Trained

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


def export_hf(trained: Trained, output: Path, force: bool = False) -> list[Path]:
    """Write `output` (.safetensors) and, beside it, config.json; returns the files written.

    An existing file is replaced only with `force`, except a config.json that already says
    exactly this model, which is left as it is. Each file is written under a temporary name
    and renamed into place, so a failed export never leaves half a file.
    """
    if trained.cfg.model.n_experts:
        raise ConfigError(f"model.n_experts={trained.cfg.model.n_experts}: plait export writes dense Llama "
                          "models only; an MoE model has no Llama layout (its checkpoint holds it in full)")
    config_path = output.parent / "config.json"
    if output.name == config_path.name:
        raise PlaitError(f"-o: '{output}' is where the model's config.json goes; name the .safetensors file")
    check_output_file(output, "-o", force)
    config_text = json.dumps(hf_config(trained.cfg.model), indent=2)
    check_output_file(config_path, "-o", force or _holds(config_path, config_text))
    # named_parameters lists a tied weight once (as the embedding), which is what HF expects.
    tensors = {hf_name(n): p.detach().to(torch.float32).contiguous() for n, p in trained.model.named_parameters()}
    # Serialised in memory and written by Python, so a full disk or a refused path is an
    # OSError naming the file (safetensors' own file writer reports neither).
    model_bytes = save(tensors, metadata={"format": "pt", "source": f"plait step {trained.step}"})
    atomic_write(output, lambda f: f.write(model_bytes))
    written = [output]
    if not _holds(config_path, config_text):
        atomic_write_text(config_path, config_text)
        written.append(config_path)
    return written


def _holds(path: Path, text: str) -> bool:
    return path.is_file() and path.read_bytes() == text.encode()
