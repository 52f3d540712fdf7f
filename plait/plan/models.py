"""What the planner needs to know about a model: its shape, parameter count and FLOPs.

A `ModelSpec` describes one decoder-only transformer. Two families are covered:
- Llama style (plait's own models): RMSNorm, no biases, rotary positions, SwiGLU MLP with
  three d x ffn_dim matrices, grouped-query attention, fused (flash) attention.
- GPT style (GPT-3, the Megatron-LM 2021 family): LayerNorm, biases, learned positions,
  GELU MLP with two d x 4d matrices, dropout, attention scores materialised in memory.

Field names follow plait's `[model]` config section so `--set model.dim=...` works the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from plait.config import ModelConfig, apply_override, config_from_dict, load_config
from plait.errors import ConfigError
from plait.layout import ModelShape


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    tie_embeddings: bool = False
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    biases: bool = False
    learned_positions: bool = False
    dropout: bool = False
    # Fused attention never stores the s x s score matrix (Korthikanti's 5as/h term vanishes).
    flash_attention: bool = True
    # A fused norm (Megatron, Korthikanti et al.) saves only its input for backward; plait's
    # plain-PyTorch RMSNorm also keeps the normalised and the scaled output.
    fused_norm: bool = True
    # A memory-efficient fused norm (Apex / Megatron `memory_efficient_layer_norm`, TE) saves its
    # output, which the next matmul keeps as its input anyway, instead of its own input: each
    # norm then costs no saved tensor of its own.
    memory_efficient_norm: bool = False
    # A fused SwiGLU (one kernel for silu(gate) * up, recomputing it for the down projection's
    # weight gradient) keeps only gate and up; plait's plain PyTorch SwiGLU also keeps
    # silu(gate) and the product: four ffn-sized tensors.
    fused_swiglu: bool = False
    # The loss walks the tokens in chunks (plait's chunked_ce, Liger-style fused linear
    # cross-entropy): fp32 logits of one chunk exist at a time, never a micro-batch's.
    chunked_loss: bool = False
    n_experts: int = 1  # >1: the MLP of MoE layers is a mixture of experts
    experts_per_token: int = 1
    # plait's MoE shape: every moe_every-th layer is MoE (the others have a dense ffn_dim MLP);
    # shared experts see every token; each expert's hidden size (0: ffn_dim). Whole-model
    # parameter counts honour all three; per-layer memory and time take the MoE layer (the
    # largest) for every layer, an upper bound when moe_every > 1.
    moe_every: int = 1
    n_shared_experts: int = 0
    expert_ffn_dim: int = 0

    def shape(self) -> ModelShape:
        """What the layout rules (plait.layout) need to know of this model."""
        return ModelShape(n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                          ffn_dim=self.ffn_dim, seq_len=self.seq_len,
                          n_experts=self.n_experts if self.n_experts > 1 else 0)

    @property
    def moe_layers(self) -> int:
        return self.n_layers // self.moe_every if self.n_experts > 1 else 0

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_dim or self.ffn_dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    # ---- parameters -------------------------------------------------------------------------
    def attention_params(self) -> int:
        weights = self.dim * self.q_dim + 2 * self.dim * self.kv_dim + self.q_dim * self.dim
        bias = (self.q_dim + 2 * self.kv_dim + self.dim) if self.biases else 0
        return weights + bias

    def mlp_params(self, hidden: int) -> int:
        weights = self.mlp_matrices * self.dim * hidden
        bias = (hidden * (self.mlp_matrices - 1) + self.dim) if self.biases else 0
        return weights + bias

    def expert_params(self) -> int:
        """One MLP (one routed expert)."""
        return self.mlp_params(self.expert_ffn if self.n_experts > 1 else self.ffn_dim)

    def shared_expert_params(self) -> int:
        """The shared experts of one MoE layer: one MLP of n_shared x the expert's hidden size."""
        return self.mlp_params(self.n_shared_experts * self.expert_ffn) if self.n_shared_experts else 0

    def norm_params(self) -> int:
        return 2 * self.dim if self.norm == "layernorm" else self.dim

    def router_params(self) -> int:
        return self.dim * self.n_experts if self.n_experts > 1 else 0

    def dense_layer_params(self) -> int:
        """Parameters of one layer that every expert-parallel rank holds (all but the experts)."""
        return self.attention_params() + self.router_params() + self.shared_expert_params() + 2 * self.norm_params()

    def layer_params(self) -> int:
        return self.dense_layer_params() + self.n_experts * self.expert_params()

    def embedding_params(self) -> int:
        positions = self.seq_len * self.dim if self.learned_positions else 0
        return self.vocab_size * self.dim + positions

    def head_params(self) -> int:
        """LM head weights that exist on their own (0 when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.dim

    def n_params(self) -> int:
        """Every parameter counted once (tied embeddings once), as plait's trainer counts them."""
        dense_layers = self.n_layers - self.moe_layers
        dense_layer = self.attention_params() + self.mlp_params(self.ffn_dim) + 2 * self.norm_params()
        layers = (self.moe_layers * self.layer_params() + dense_layers * dense_layer if self.n_experts > 1
                  else self.n_layers * self.layer_params())
        return self.embedding_params() + layers + self.norm_params() + self.head_params()

    def active_params(self) -> int:
        """Parameters one token touches (an MoE token uses experts_per_token experts)."""
        inactive = (self.n_experts - self.experts_per_token) * self.expert_params()
        return self.n_params() - (self.moe_layers if self.n_experts > 1 else self.n_layers) * inactive

    # ---- FLOPs per token ----------------------------------------------------------------------
    def layer_matmul_flops(self) -> float:
        """Forward FLOPs of one layer's weight matmuls for one token (2 per multiply-add)."""
        attention = self.dim * self.q_dim + 2 * self.dim * self.kv_dim + self.q_dim * self.dim
        mlp = self.experts_per_token * self.mlp_matrices * self.dim * self.ffn_dim
        return 2.0 * (attention + mlp + self.router_params())

    def attention_score_flops(self, context: int | None = None) -> float:
        """Forward FLOPs of QK^T and scores x V for one token against `context` keys (no causal saving)."""
        return 4.0 * (context or self.seq_len) * self.q_dim

    def head_flops(self) -> float:
        return 2.0 * self.vocab_size * self.dim

    def model_flops_per_token(self) -> float:
        """6N + 12 L d s: the PaLM / Llama 3 MFU numerator (N: every active parameter, as plait's trainer)."""
        return 6.0 * self.active_params() + 12.0 * self.n_layers * self.dim * self.seq_len

    def hardware_flops_per_token(self, recompute: str) -> float:
        """FLOPs actually executed per token, forward + backward + recomputation (Megatron-LM 2021).

        Backward costs twice the forward. Full recompute repeats each layer's forward once;
        selective recompute repeats only the attention-score part. The LM head is never recomputed.
        With recompute="full" and a GPT model this equals 96 B s l h^2 (1 + s/6h + V/16lh) / (B s).
        """
        layer = self.layer_matmul_flops() + self.attention_score_flops()
        extra = {"none": 0.0, "selective": self.attention_score_flops(), "full": layer}[recompute]
        return self.n_layers * (3.0 * layer + extra) + 3.0 * self.head_flops()


def _gpt(name: str, layers: int, dim: int, heads: int, *, megatron: bool) -> ModelSpec:
    # Megatron-LM 2021 trained with dropout and unfused attention; a modern GPT-3 run would not.
    return ModelSpec(
        name=name, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, ffn_dim=4 * dim,
        vocab_size=51200, seq_len=2048, tie_embeddings=True, mlp="gelu", norm="layernorm",
        biases=True, learned_positions=True, dropout=megatron, flash_attention=not megatron,
    )


def _llama3(name: str, layers: int, dim: int, heads: int, ffn: int) -> ModelSpec:
    # As a production framework trains it (Megatron-Core / TE, Llama 3's own): fused
    # memory-efficient RMSNorm, fused SwiGLU, flash attention, vocabulary-parallel loss.
    return ModelSpec(name=name, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=8, ffn_dim=ffn,
                     vocab_size=128256, seq_len=8192, memory_efficient_norm=True, fused_swiglu=True)


# Narayanan et al. 2021, Table 1 (heads, hidden, layers).
MEGATRON_2021 = {
    "megatron-1.7b": (24, 2304, 24), "megatron-3.6b": (32, 3072, 30), "megatron-7.5b": (32, 4096, 36),
    "megatron-18b": (48, 6144, 40), "megatron-39b": (64, 8192, 48), "megatron-76b": (80, 10240, 60),
    "megatron-146b": (96, 12288, 80), "megatron-310b": (128, 16384, 96),
    "megatron-530b": (128, 20480, 105), "megatron-1t": (160, 25600, 128),
}

PRESETS: dict[str, ModelSpec] = {
    "gpt3-175b": _gpt("gpt3-175b", 96, 12288, 96, megatron=False),
    "llama3-8b": _llama3("llama3-8b", 32, 4096, 32, 14336),
    "llama3-70b": _llama3("llama3-70b", 80, 8192, 64, 28672),
    "llama3-405b": _llama3("llama3-405b", 126, 16384, 128, 53248),
    **{name: _gpt(name, layers, dim, heads, megatron=True)
       for name, (heads, dim, layers) in MEGATRON_2021.items()},
}

SPEC_FIELDS = {f.name: f.type for f in dataclasses.fields(ModelSpec)}


def from_plait_model(model: ModelConfig, name: str) -> ModelSpec:
    """A plait `ModelConfig` (Llama style, flash attention, no dropout) as a ModelSpec, MoE included."""
    moe = model.n_experts > 0
    return ModelSpec(
        name=name, dim=model.dim, n_layers=model.n_layers, n_heads=model.n_heads,
        n_kv_heads=model.n_kv_heads, ffn_dim=model.ffn_dim, vocab_size=model.vocab_size,
        seq_len=model.seq_len, tie_embeddings=model.tie_embeddings, fused_norm=False,
        n_experts=model.n_experts if moe else 1, experts_per_token=model.top_k if moe else 1,
        moe_every=model.moe_every if moe else 1, n_shared_experts=model.n_shared_experts if moe else 0,
        expert_ffn_dim=model.moe_ffn_dim if moe else 0,
    )


def override(spec: ModelSpec, dotted: str, text: str) -> ModelSpec:
    """Apply one `model.field=value` to a plan preset."""
    field_name = dotted.removeprefix("model.")
    if field_name not in SPEC_FIELDS or field_name == "name":
        raise ConfigError(f"unknown model field '{dotted}' (known: {', '.join(sorted(SPEC_FIELDS))})")
    current = getattr(spec, field_name)
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            value: object = text.lower() == "true"
        elif isinstance(current, int):
            value = int(text)
        else:
            value = text
    except ValueError:
        raise ConfigError(f"{dotted}={text!r} must be a {type(current).__name__}") from None
    return dataclasses.replace(spec, **{field_name: value})


def check_spec(spec: ModelSpec) -> None:
    """Raise ConfigError for a shape no layout could run."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "seq_len",
                 "n_experts", "experts_per_token", "moe_every"):
        if getattr(spec, name) < 1:
            raise ConfigError(f"model.{name}={getattr(spec, name)} must be at least 1")
    if spec.dim % spec.n_heads:
        raise ConfigError(f"model.dim={spec.dim} is not divisible by model.n_heads={spec.n_heads}")
    if spec.n_heads % spec.n_kv_heads:
        raise ConfigError(f"model.n_heads={spec.n_heads} is not divisible by model.n_kv_heads={spec.n_kv_heads}")
    if spec.experts_per_token > spec.n_experts:
        raise ConfigError(f"model.experts_per_token={spec.experts_per_token} exceeds model.n_experts={spec.n_experts}")
    if spec.mlp not in ("swiglu", "gelu"):
        raise ConfigError(f"model.mlp={spec.mlp!r} must be swiglu or gelu")
    if spec.norm not in ("rmsnorm", "layernorm"):
        raise ConfigError(f"model.norm={spec.norm!r} must be rmsnorm or layernorm")


def resolve_model(name: str | None, overrides: list[str]) -> tuple[ModelSpec, int | None, str]:
    """The model spec, the config's global batch (None for plan presets) and a precision name."""
    if name in PRESETS:
        spec = PRESETS[name]
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("model."):
                raise ConfigError(f"--set '{item}' must look like model.field=value for plan preset '{name}'")
            spec = override(spec, key.strip(), value.strip())
        return spec, None, "bf16"
    if name is None:
        if not overrides:
            raise ConfigError("--model is required (a plan preset, a plait preset or a TOML config)")
        cfg = config_from_dict({"name": "custom"})
        for item in overrides:
            apply_override(cfg, item)
    else:
        try:
            cfg = load_config(name, overrides)
        except ConfigError as exc:
            raise ConfigError(f"--model {name!r}: {exc} (plan presets: {', '.join(PRESETS)})") from None
    precision = "fp32" if cfg.train.dtype == "fp32" else "bf16"
    return from_plait_model(cfg.model, cfg.name), cfg.train.global_batch, precision
