"""Typed run configuration: defaults, presets, TOML files and `--set` overrides.

A config is a tree of dataclasses. Every value that reaches it (from a preset, a TOML
file or `--set section.key=value`) is coerced to the field's declared type, and anything
unknown, mistyped or impossible raises ConfigError naming the field. `validate` checks
the combinations that depend on the world size (parallel degrees, batch divisibility).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal


from plait.errors import ConfigError
from plait.fault_spec import parse_faults
from plait.layout import Features, Job, Layout, ModelShape, check_job
from plait.layout.batch import batch_problem, micro_batches
from plait.layout.pipeline import SCHEDULE_ALIASES


@dataclass
class ModelConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    vocab_size: int = 256
    seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Mixture of experts (plait/model/moe.py): 0 experts is the dense model.
    n_experts: int = 0  # routed experts per MoE layer
    top_k: int = 2  # experts each token is sent to
    moe_every: int = 1  # every moe_every-th block (counting from 1) has an MoE MLP
    n_shared_experts: int = 0  # experts every token goes through (DeepSeek-MoE)
    moe_ffn_dim: int = 0  # hidden size of each expert; 0: ffn_dim
    capacity_factor: float = 0.0  # slots per expert = ceil(tokens x top_k / n_experts x factor); 0: dropless
    router: Literal["softmax", "sigmoid"] = "softmax"


@dataclass
class ParallelConfig:
    dp: int = 0  # 0: the world size divided by tp x cp x pp
    tp: int = 1
    pp: int = 1
    pp_microbatches: int = 0  # micro-batches per step in the pipeline; 0: the accumulation steps (layout/batch.py)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = "1f1b"
    pp_virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    pp_layers: list[int] = field(default_factory=list)  # layers per virtual stage; []: balanced by cost
    cp: int = 1
    ep: int = 1  # expert parallel, folded into tp x cp x dp (not an extra factor of the world size)
    etp: int = 1  # tensor parallel of the experts (only 1 for now)
    sequence_parallel: bool = True  # Megatron sequence parallelism (only matters when tp > 1)
    zero: int = 0  # ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype gradients are held and reduced in
    offload: Literal["none", "optimizer"] = "none"  # optimizer: master weights + AdamW state in host memory
    bucket_mb: float = 25.0  # gradient reduction bucket size
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0  # collective timeout
    # Every-step gradient all-reduce replaced by PowerSGD (rank compression.rank) or by
    # PowerSGD with per-layer ranks chosen by L-GreCo's dynamic programme (adaptive).
    grad_compression: Literal["none", "powersgd", "adaptive"] = "none"


@dataclass
class TrainConfig:
    steps: int = 500
    global_batch: int = 32  # sequences per optimizer step, summed over all ranks
    micro_batch: int = 0  # most sequences per forward pass per rank; 0: ceil(global_batch / dp)
    seed: int = 1234
    dtype: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 8  # global batches of the validation split per evaluation
    compile: bool = False
    # What train.compile compiles: the whole model (fastest steps: fusion across blocks), each
    # block on its own (compiles once for all the identical blocks), or auto (see compute.py).
    compile_scope: Literal["auto", "model", "blocks"] = "auto"
    # RMSNorm, SwiGLU and rotary as fused Triton kernels (plait.kernels) or the plain PyTorch
    # reference; auto: fused on CUDA in eager mode, reference elsewhere (see compute.py).
    kernels: Literal["auto", "reference", "fused"] = "auto"
    # The LM head and loss in chunks of tokens, never holding a whole batch's fp32 logits
    # (plait.kernels.chunked_ce); auto: on for CUDA where the model allows it (tp, pp = 1, ZeRO < 3).
    chunked_ce: Literal["auto", "on", "off"] = "auto"
    ce_chunk_tokens: int = 4096
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation in backward
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_tokens: int = 200  # length of the sample printed at the end; 0: none
    threads: int = 0  # torch intra-op threads per process; 0: cores / local processes
    lbl_coef: float = 0.01  # MoE load-balancing loss coefficient (per MoE layer)
    z_loss_coef: float = 0.0  # MoE router z-loss coefficient (per MoE layer)
    lbl_scope: Literal["micro_batch", "global_batch"] = "global_batch"  # where f_i is counted
    # How data-parallel workers agree: every step (gradient all-reduce), or local SGD with an
    # outer step every sync.inner_steps steps (DiLoCo, NoLoCo, CO2; see [sync]).
    sync: Literal["every_step", "diloco", "noloco", "co2"] = "every_step"


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "galore"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0: off
    momentum: float = 0.9  # sgd
    rank: int = 128  # galore: rank of the gradient projection of 2-D weights
    update_proj_gap: int = 200  # galore: steps between projection refreshes
    scale: float = 0.25  # galore: scale of the projected-back update


@dataclass
class SyncConfig:
    """Local SGD (train.sync = diloco | noloco | co2): the outer step over the dp workers."""

    inner_steps: int = 50  # H: inner optimizer steps between outer steps
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True  # diloco
    fragments: int = 1  # diloco: streaming fragments synchronised at staggered steps
    bf16: bool = False  # diloco: bf16 pseudo-gradients on the wire
    group_size: int = 2  # noloco: workers averaged together
    clip: float = 0.0  # co2: outer-momentum norm clipping; 0: off
    gap_penalty: float = 1.0  # co2: staleness-gap penalty dividing the stale average


@dataclass
class CompressionConfig:
    """Gradient compression (parallel.grad_compression = powersgd | adaptive)."""

    rank: int = 4  # PowerSGD rank (the default rank of the adaptive choice)
    warmup_steps: int = 10  # first steps all-reduced uncompressed
    adjust_every: int = 100  # adaptive: steps between re-choosing the per-layer ranks
    min_compression: float = 1.0  # compress a matrix only if its factors are this many times smaller


@dataclass
class DataConfig:
    # "shakespeare" | "python" | a text file | a folder of text files | a .bin from `plait prepare`
    corpus: str = "shakespeare"
    tokenizer: Literal["byte", "bpe"] = "byte"
    val_fraction: float = 0.05
    cache_dir: str = ""  # "": $PLAIT_CACHE or ~/.cache/plait
    encoding: str = "utf-8"  # of a text file or folder corpus: any text codec Python knows, e.g. latin-1
    # Several corpora mixed by weight, { "corpus" = weight, ... } (each as data.corpus names one, all
    # with one tokenizer; weights are normalised); when not empty it replaces data.corpus.
    mix: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 3  # newest checkpoints kept on disk
    resume: str = "auto"  # "auto" | "never" | a checkpoint directory
    # Resume even though the tokenizer changed since the checkpoint (its token ids then mean
    # other text): only when the user asks for it, as when moving a model to a new corpus.
    reset_data: bool = False
    # Write checkpoints in the background: each rank copies its pieces to host memory and trains
    # on while a writer thread saves them (train/async_writer.py). Also settable as checkpoint.async.
    async_save: bool = True


@dataclass
class LogConfig:
    every: int = 10  # steps between console lines (metrics.jsonl gets every step)
    tensorboard: bool = True
    trace: bool = False  # write a Chrome/Perfetto trace per rank (trace-rank{R}.json)
    progress: Literal["auto", "rich", "plain", "none"] = "auto"


@dataclass
class FaultConfig:
    # Faults to rehearse, ";"-separated: "crash@rank=2,step=7", "hang@rank=1,step=5",
    # "slow@rank=3,delay=0.5" (from step= on, default 1); "": none. See plait/resilience/inject.py.
    inject: str = ""


@dataclass
class ResilienceConfig:
    # restart: the launcher restarts the workers after a fault and they resume from the newest
    # in-memory snapshot (else checkpoint); none: a fault ends the run. elastic: the survivors
    # re-form in place for the smaller world and a replacement joins later (resilience/elastic.py).
    mode: Literal["none", "restart", "elastic"] = "restart"
    max_restarts: int = 3  # worker-group restarts the local launcher allows (restart mode); elastic: replacements
    # steps between in-memory snapshots (restart mode under a launcher) or replicas (elastic); 0: none
    snapshot_every: int = 25
    heartbeat_s: float = 0.5  # how often each rank's watchdog publishes its heartbeat
    # A collective is hung when the ranks in it have waited max(hang_min_s, hang_k x the median
    # step time) while a live rank that is training (past resilience.warmup_steps, outside an
    # announced long phase: evaluation, checkpoint, snapshot) has not entered it.
    hang_min_s: float = 5.0
    hang_k: float = 10.0
    warmup_steps: int = 3  # steps (after each start) before the fast hang rule applies
    # An explicit hang threshold, applied in every phase; 0: the fast rule above, with
    # parallel.timeout_s / 2 as the backstop for long phases and warm-up.
    hang_s: float = 0.0
    # After the first rank is seen gone, how long the monitor gathers evidence (the other
    # ranks' last heartbeats, further exits) before naming the culprit.
    settle_s: float = 1.5
    slow_k: float = 8.0  # a rank is slow when its lateness exceeds the median by slow_k MADs ...
    slow_window: int = 8  # ... over this many steps (and by at least slow_min_fraction of a step)
    slow_min_fraction: float = 0.1
    # ... and by at least this many seconds: scheduling jitter on a loaded CPU is never "slow"
    slow_min_s: float = 0.05
    # elastic: how long rank 0 holds the shrunken group at a step boundary for a replacement
    # that the launcher has started but that has not registered yet; 0: do not wait
    grow_wait_s: float = 0.0


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "name"}

# Keys that cannot be field names (`async` is a Python keyword): the key users write -> the field.
KEY_ALIASES: dict[str, str] = {"checkpoint.async": "checkpoint.async_save"}

# Other spellings a field accepts for one of its values; the value is stored in its one spelling.
VALUE_ALIASES: dict[str, dict[str, str]] = {"parallel.pp_schedule": SCHEDULE_ALIASES}


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take, and how an error message says so."""

    low: float
    high: float = math.inf
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    text: str = ""

    def __contains__(self, value: float) -> bool:
        # Written so that NaN, which compares false with everything, is never inside.
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


YEAR_S = 365 * 24 * 3600  # a longer wait is a typo (and far longer ones overflow timedelta and sleep)
AT_LEAST_1 = Range(1, text="must be at least 1")
NOT_NEGATIVE = Range(0, text="must not be negative")
POSITIVE = Range(0, low_open=True, text="must be > 0")
FRACTION = Range(0, 1, high_open=True, text="must lie in [0, 1)")
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True, text="must lie strictly between 0 and 1")
DURATION = Range(0, YEAR_S, low_open=True, text=f"must be > 0 and at most a year ({YEAR_S} s)")
DURATION_OR_OFF = Range(0, YEAR_S, text=f"must lie between 0 and a year ({YEAR_S} s)")

# Every numeric field and the values it may take (each item of a tuple, such as optim.betas).
# Fields where 0 means "derive it", "off" or "none" are NOT_NEGATIVE. Cross-field rules
# (min_lr <= lr, top_k <= n_experts, ...) stay in `validate`.
RANGES: dict[str, Range] = {
    **dict.fromkeys([
        "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_dim",
        "model.vocab_size", "model.seq_len", "model.top_k", "model.moe_every",
        "parallel.tp", "parallel.pp", "parallel.pp_virtual_stages", "parallel.cp", "parallel.ep", "parallel.etp",
        "train.steps", "train.global_batch", "train.eval_batches", "train.ce_chunk_tokens",
        "optim.rank", "optim.update_proj_gap", "sync.inner_steps", "sync.fragments", "sync.group_size",
        "compression.rank", "compression.adjust_every", "checkpoint.keep", "log.every",
    ], AT_LEAST_1),
    **dict.fromkeys([
        "model.n_experts", "model.n_shared_experts", "model.moe_ffn_dim", "model.capacity_factor",
        "parallel.dp", "parallel.pp_microbatches", "parallel.zero",
        "train.micro_batch", "train.seed", "train.eval_every", "train.sample_tokens", "train.threads",
        "train.lbl_coef", "train.z_loss_coef",
        "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
        "sync.clip", "compression.warmup_steps", "checkpoint.every",
        "resilience.max_restarts", "resilience.snapshot_every", "resilience.slow_window",
        "resilience.warmup_steps",
    ], NOT_NEGATIVE),
    **dict.fromkeys([
        "model.rope_theta", "model.norm_eps", "parallel.bucket_mb", "optim.lr", "optim.eps", "optim.scale",
        "sync.outer_lr", "sync.gap_penalty", "compression.min_compression", "resilience.slow_k",
        "resilience.hang_k",
    ], POSITIVE),
    **dict.fromkeys(["optim.betas", "optim.momentum", "sync.outer_momentum", "resilience.slow_min_fraction"],
                    FRACTION),
    "data.val_fraction": OPEN_FRACTION,
    "parallel.timeout_s": DURATION,
    "resilience.heartbeat_s": DURATION,
    **dict.fromkeys(["resilience.hang_s", "resilience.grow_wait_s", "resilience.slow_min_s"], DURATION_OR_OFF),
    **dict.fromkeys(["resilience.hang_min_s", "resilience.settle_s"], DURATION),
}


def preset_names() -> list[str]:
    files = resources.files("plait.configs").iterdir()
    return sorted(p.name[: -len(".toml")] for p in files if p.name.endswith(".toml"))


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from a preset name or TOML path (default `tiny`) plus `KEY=VALUE` overrides."""
    source = source or "tiny"
    path = Path(source)
    if source.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file '{source}' does not exist")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8 by definition
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{source}' is not UTF-8 text "
                              f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start}), as TOML must be") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{source}' is not valid TOML: {exc}") from None
        raw.setdefault("name", path.stem)
    elif source in preset_names():
        raw = tomllib.loads(resources.files("plait.configs").joinpath(f"{source}.toml").read_text())
        raw.setdefault("name", source)
    else:
        raise ConfigError(
            f"'{source}' is neither a TOML file nor a preset (presets: {', '.join(preset_names())})"
        )
    cfg = config_from_dict(raw)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in raw.items():
        if key == "name":
            cfg.name = plain_name(value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
            for sub, subvalue in value.items():
                set_field(cfg, f"{key}.{sub}", subvalue)
        else:
            raise ConfigError(_unknown(key, ["name", *SECTIONS]))
    return cfg


def plain_name(value: Any) -> str:
    """`name` names the default run directory runs/<name>: a plain file name, never a path."""
    name = _coerce("name", value, str)
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise ConfigError(f"name={name!r} must be a plain file name (no '/', '\\', '..' or absolute path), "
                          "as it names the run directory runs/<name>")
    return name


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `section.key=value` override; the value is read as a TOML literal when it is one."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{item}' must look like section.key=value")
    set_field(cfg, key, _parse_literal(text.strip()))


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    dotted = KEY_ALIASES.get(dotted, dotted)
    section_name, _, key = dotted.partition(".")
    if section_name not in SECTIONS or not key:
        if dotted == "name":
            cfg.name = plain_name(value)
            return
        raise ConfigError(_unknown(dotted, [f"{s}.*" for s in SECTIONS]))
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(_unknown(dotted, [f"{section_name}.{k}" for k in hints]))
    if isinstance(value, str):
        value = VALUE_ALIASES.get(dotted, {}).get(value, value)
    setattr(section, key, _coerce(dotted, value, hints[key]))


def _parse_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as bf16 or a path


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if isinstance(value, str):
            value = _parse_literal(f"[{value.strip('()[]')}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{name}={value!r} must be a list of {len(item_types)} numbers")
        return tuple(_coerce(name, v, t) for v, t in zip(value, item_types))
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = _parse_literal(f"[{value.strip('[]')}]")
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} must be a list")
        return [_coerce(name, v, item_type) for v in value]
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if isinstance(value, str):
            value = _parse_literal(f"{{{value.strip('{}')}}}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a table, e.g. {{ a = 0.7, b = 0.3 }}")
        return {_coerce(name, k, key_type): _coerce(f"{name}.{k}", v, value_type) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"config field {name} uses an unsupported union type")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        if not -(2**63) <= value < 2**63:  # tomllib reads any size; torch and numpy take 64 bits
            raise ConfigError(f"{name}={value} does not fit in 64 bits")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        # TOML has nan and inf literals, and an integer can be too large for a float; no
        # setting means any of them.
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{name}={value!r} must be a finite number")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a string")
        return str(value)
    raise TypeError(f"config field {name} has an unsupported type {annotation!r}")


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}"


def check_ranges(cfg: Config) -> None:
    """Raise ConfigError for the first numeric field outside its `RANGES` entry or not finite."""
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        for spec in dataclasses.fields(section):
            dotted, value = f"{section_name}.{spec.name}", getattr(section, spec.name)
            items = value if isinstance(value, (tuple, list)) else (value,)
            numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
            shown = list(value) if isinstance(value, tuple) else value
            # A config built in code skips `_coerce`, so finiteness is checked here too.
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{dotted}={shown} must be a finite number")
            allowed = RANGES.get(dotted)
            if allowed is not None and not all(v in allowed for v in numbers):
                raise ConfigError(f"{dotted}={shown} {allowed.text}")


def check_encoding(name: str) -> None:
    """Raise ConfigError unless `name` is a text codec Python knows (base64 and rot13 are not)."""
    try:
        "".encode(name)  # raises for a non-text codec even on empty input, unlike b"".decode
    except (LookupError, UnicodeError):  # UnicodeError: the codec named "undefined"
        raise ConfigError(f"data.encoding={name!r} is not a text encoding Python knows "
                          "(e.g. utf-8, latin-1, cp1252, utf-16)") from None


def validate(cfg: Config, world_size: int) -> Config:
    """Check every cross-field constraint for a job of `world_size` processes; resolve derived values.

    Returns the same Config with `parallel.dp`, `train.micro_batch` and (pipelines)
    `parallel.pp_microbatches` filled in. Whether the layout can run is decided by the rules
    of plait.layout, the ones the planner uses too; this function holds the rest.
    """
    m, t, o = cfg.model, cfg.train, cfg.optim
    check_ranges(cfg)
    check_encoding(cfg.data.encoding)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for rotary embeddings")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.n_experts:
        if not 1 <= m.top_k <= m.n_experts:
            raise ConfigError(f"model.top_k={m.top_k} must lie between 1 and model.n_experts={m.n_experts}")
        if not 1 <= m.moe_every <= m.n_layers:
            raise ConfigError(f"model.moe_every={m.moe_every} must lie between 1 and model.n_layers={m.n_layers}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
    if cfg.checkpoint.resume not in ("auto", "never") and not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume must be auto, never, or a checkpoint directory")
    if t.sync != "every_step" and not 1 <= cfg.sync.fragments <= cfg.sync.inner_steps:
        raise ConfigError(f"sync.fragments={cfg.sync.fragments} must lie between 1 and "
                          f"sync.inner_steps={cfg.sync.inner_steps}")
    parse_faults(cfg.fault.inject)  # raises ConfigError naming fault.inject

    _derive_sizes(cfg, world_size)
    reason = check_job(job_of(cfg, world_size))
    if reason is not None:
        raise ConfigError(reason)
    return cfg


def _derive_sizes(cfg: Config, world_size: int) -> None:
    """Fill in dp, micro_batch and pp_microbatches where the config leaves them at 0."""
    p, t = cfg.parallel, cfg.train
    others = p.tp * p.cp * p.pp
    if p.dp == 0:
        if world_size % others:
            raise ConfigError(f"world size {world_size} is not divisible by tp x cp x pp = {others}")
        p.dp = world_size // others
    if p.dp * others != world_size:
        raise ConfigError(
            f"parallel.dp={p.dp} x tp={p.tp} x cp={p.cp} x pp={p.pp} = {p.dp * others} != world size {world_size}"
        )
    if t.micro_batch == 0:
        # One micro-batch per step: as many rows as the dp rank with the most (layout/batch.py).
        t.micro_batch = -(-t.global_batch // p.dp)
    # Any dp serves any global batch, its rows shared out unevenly if need be; refused only
    # where some rank would be left with an empty micro-batch.
    problem = batch_problem(t.global_batch, t.micro_batch, p.dp)
    if problem is not None:
        raise ConfigError(problem)
    if p.pp > 1:
        # The pipeline runs `parallel.pp_microbatches` micro-batches per step: the accumulation steps.
        accumulation = accumulation_steps(cfg)
        if p.pp_microbatches == 0:
            p.pp_microbatches = accumulation
        elif p.pp_microbatches != accumulation:
            raise ConfigError(
                f"parallel.pp_microbatches={p.pp_microbatches} != train.global_batch / (train.micro_batch x dp) "
                f"= {accumulation}; {_pp_microbatches_fix(t.global_batch, p.dp, p.pp_microbatches)}")


def _pp_microbatches_fix(global_batch: int, dp: int, wanted: int) -> str:
    """What to set for `wanted` micro-batches per step: the micro_batch that gives exactly that
    many (global_batch / (dp x wanted) where that divides), or, where none does, the default."""
    most_rows = -(-global_batch // dp)  # the rows of the fullest dp rank
    micro_batch = -(-most_rows // wanted)
    if micro_batches(global_batch, micro_batch, dp) == wanted and batch_problem(global_batch, micro_batch, dp) is None:
        return f"set train.micro_batch={micro_batch} or leave pp_microbatches at 0"
    return f"no train.micro_batch gives {wanted} micro-batches per rank; leave pp_microbatches at 0"


def job_of(cfg: Config, world_size: int) -> Job:
    """The config as the layout rules see it (after `validate` has derived dp and micro_batch)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    layout = Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, etp=p.etp, zero=p.zero,
                    micro_batch=t.micro_batch, schedule=p.pp_schedule, virtual_stages=p.pp_virtual_stages,
                    recompute=t.recompute, sequence_parallel=p.sequence_parallel, pp_layers=tuple(p.pp_layers))
    shape = ModelShape(n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim,
                       seq_len=m.seq_len, n_experts=m.n_experts)
    features = Features(compile=t.compile, chunked_ce=t.chunked_ce, optimizer=cfg.optim.name, sync=t.sync,
                        grad_compression=p.grad_compression)
    return Job(layout, shape, world_size, t.global_batch, features)


def accumulation_steps(cfg: Config) -> int:
    """Micro-batches per step on every dp rank (after `validate`): the same on all of them, since
    ZeRO-3 and the pipeline run collectives in each; enough for the rank with the most rows."""
    return micro_batches(cfg.train.global_batch, cfg.train.micro_batch, cfg.parallel.dp)


def to_dict(cfg: Config) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(cfg.optim.betas)
    return out


def to_toml(cfg: Config) -> str:
    import tomli_w  # here, not at the top: the GPU benchmark machines' image lacks it and never writes TOML

    return tomli_w.dumps(to_dict(cfg))
