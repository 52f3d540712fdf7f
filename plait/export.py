"""Export a run's model with Hugging Face Llama parameter names (safetensors + config.json).

plait's rotary embedding already uses the rotate-half convention of Hugging Face's Llama,
so the query and key weights are written as they are, with no permutation.

A model larger than `max_shard_size` is split as Hugging Face splits it: `model-00001-of-0000N
.safetensors` files and `model.safetensors.index.json` saying which file holds each tensor
(named after `-o`; call it model.safetensors for `from_pretrained`). The shards are planned
from the tensors' shapes alone, then filled and written one at a time, each tensor read from
the checkpoint when its shard is written (`Trained.parameter`): memory holds one shard, never
the whole model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from plait.config import ModelConfig
from plait.data.tokenfile import atomic_write_text
from plait.errors import ConfigError, PlaitError
from plait.outputs import check_output_file, parse_size
from plait.train.trained import Trained

EXPORT_DTYPE = torch.float32  # what config.json's torch_dtype says
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained

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


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """(name, bytes) in model order, cut into shards of at most `max_bytes` each; a tensor larger
    than that gets a shard of its own rather than being split."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes:
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_paths(output: Path, count: int) -> list[Path]:
    """Where the shards of an export to `output` go: `output` itself when there is one."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i:05d}-of-{count:05d}{output.suffix}") for i in range(1, count + 1)]


def index_path(output: Path) -> Path:
    return output.with_name(output.name + ".index.json")


def export_hf(trained: Trained, output: Path, force: bool = False,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write `output` (.safetensors), or its shards and index when the model is larger than
    `max_shard_size`, and, beside them, config.json; returns the files written.

    An existing file is replaced only with `force`, except a config.json that already says
    exactly this model, which is left as it is; so are the files of an earlier export to the
    same `output` that this one would leave inconsistent (a single file beside a new index,
    shards of another count), which `force` removes. Every file is written under a temporary
    name and renamed into place once all are written, so a failed export never leaves half a
    file, nor a mix of new shards and old ones.
    """
    if trained.cfg.model.n_experts:
        raise ConfigError(f"model.n_experts={trained.cfg.model.n_experts}: plait export writes dense Llama "
                          "models only; an MoE model has no Llama layout (its checkpoint holds it in full)")
    max_bytes = parse_size(max_shard_size)
    config_path = output.parent / "config.json"
    if output.name == config_path.name:
        raise PlaitError(f"-o: '{output}' is where the model's config.json goes; name the .safetensors file")
    # named_parameters lists a tied weight once (as the embedding), which is what HF expects. The
    # model may be on the meta device (a sharded checkpoint): its shapes are all the plan needs.
    shapes = {name: p.shape for name, p in trained.model.named_parameters()}
    sizes = [(name, shape.numel() * EXPORT_DTYPE.itemsize) for name, shape in shapes.items()]
    shards = plan_shards(sizes, max_bytes)
    paths = shard_paths(output, len(shards))
    index = index_path(output) if len(shards) > 1 else None
    written = paths + ([index] if index else [])
    stale = [p for p in _earlier_export(output) if p not in written]
    for path in written + stale:
        check_output_file(path, "-o", force)
    config_text = json.dumps(hf_config(trained.cfg.model), indent=2)
    check_output_file(config_path, "-o", force or _holds(config_path, config_text))

    metadata = {"format": "pt", "source": f"plait step {trained.step}"}
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for names, path in zip(shards, paths):
            tensors = {hf_name(n): trained.parameter(n).to(EXPORT_DTYPE).contiguous() for n in names}
            staged.append((_staged_write(path, lambda tmp, shard=tensors, final=path:
                                         _save_file(shard, tmp, final, metadata)), path))
            del tensors  # before the next shard is read
        if index:
            weight_map = {hf_name(n): path.name for names, path in zip(shards, paths) for n in names}
            text = json.dumps({"metadata": {"total_size": sum(size for _, size in sizes)},
                               "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
            staged.append((_staged_write(index, lambda tmp: tmp.write_text(text)), index))
        for tmp, path in staged:  # the index last: it is what makes the shards one model
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for path in stale:
        path.unlink(missing_ok=True)
    if not _holds(config_path, config_text):
        atomic_write_text(config_path, config_text)
        written.append(config_path)
    return written


def _earlier_export(output: Path) -> list[Path]:
    """The files an export to `output` may have written: the single file, an index, shards."""
    pattern = re.compile(rf"^{re.escape(output.stem)}-\d{{5}}-of-\d{{5}}{re.escape(output.suffix)}$")
    shards = sorted(p for p in output.parent.iterdir() if pattern.match(p.name)) if output.parent.is_dir() else []
    return [p for p in (output, index_path(output)) if p.exists()] + shards


def _staged_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write` a temporary file beside `path` (renamed into place by the caller); an OSError names `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    return tmp


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, path: Path, metadata: dict[str, str]) -> None:
    """safetensors' file writer (memory: the tensors, no serialised copy), with a refused write
    made an OSError naming `path`: safetensors raises its own error, with the errno in its text."""
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _holds(path: Path, text: str) -> bool:
    return path.is_file() and path.read_bytes() == text.encode()
