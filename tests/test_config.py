"""Config loading, overrides, type checking and the cross-field validation."""

import pytest

from plait.config import accumulation_steps, load_config, preset_names, to_toml, validate
from plait.errors import ConfigError


def test_presets_load_and_validate():
    assert {"tiny", "gpt2-124m", "llama-1b"} <= set(preset_names())
    for name in ("tiny", "gpt2-124m", "llama-1b"):
        cfg = load_config(name)
        assert cfg.name == name
        validate(cfg, world_size=8)


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config("tiny", ["train.steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]",
                               "model.tie_embeddings=false", "train.dtype=bf16", "data.corpus=my text.txt",
                               "optim.weight_decay=0"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.tie_embeddings is False and cfg.train.dtype == "bf16"
    assert cfg.data.corpus == "my text.txt" and cfg.optim.weight_decay == 0.0


def test_dp_and_micro_batch_are_derived_from_the_world_size():
    cfg = validate(load_config("tiny", ["train.global_batch=16", "train.micro_batch=0"]), world_size=4)
    assert cfg.parallel.dp == 4 and cfg.train.micro_batch == 4 and accumulation_steps(cfg) == 1
    cfg = validate(load_config("tiny", ["train.global_batch=16", "train.micro_batch=2"]), world_size=2)
    assert accumulation_steps(cfg) == 4


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = validate(load_config("tiny", ["train.steps=3"]), world_size=2)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(str(path))
    assert again == cfg


@pytest.mark.parametrize("override, world, message", [
    ("train.stpes=3", 1, "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("modle.dim=3", 1, "unknown config key 'modle.dim'"),
    ("train.steps=abc", 1, "train.steps='abc' must be an integer"),
    ("train.steps=1.5", 1, "train.steps=1.5 must be an integer"),
    ("train.dtype=fp16", 1, "train.dtype='fp16' is not one of fp32, bf16"),
    ("model.tie_embeddings=maybe", 1, "model.tie_embeddings='maybe' must be true or false"),
    ("parallel.dp=3", 4, "parallel.dp=3 x tp=1 x cp=1 x pp=1 = 3 != world size 4"),
    ("parallel.tp=3", 3, "model.n_heads=4 is not divisible by parallel.tp=3"),
    ("parallel.tp=4", 4, "model.n_kv_heads=2 < parallel.tp=4"),
    ("parallel.cp=3", 3, "model.seq_len=128 must be divisible by 2 x parallel.cp = 6"),
    ("train.recompute=some", 1, "train.recompute='some' is not one of none, selective, full"),
    ("parallel.ep=2", 2, "parallel.ep=2 / etp=1 need an MoE model"),
    ("parallel.pp_schedule=zz", 2, "parallel.pp_schedule='zz' is not one of"),
    ("parallel.reduce_dtype=fp16", 2, "parallel.reduce_dtype='fp16' is not one of fp32, bf16"),
    ("parallel.zero=5", 2, "parallel.zero=5 must be 0, 1, 2 or 3"),
    ("model.n_heads=3", 1, "model.dim=128 is not divisible by model.n_heads=3"),
    ("model.n_kv_heads=3", 1, "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    ("train.global_batch=3", 4, "train.global_batch=3 is smaller than dp=4"),
    ("train.steps=0", 1, "train.steps=0 must be at least 1"),
    ("optim.min_lr=1", 1, "optim.min_lr=1.0 is larger than optim.lr"),
    ("data.val_fraction=1.5", 1, "data.val_fraction=1.5 must lie strictly between 0 and 1"),
])
def test_bad_values_name_the_field(override, world, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny", [override]), world_size=world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_micro_batch_must_leave_no_rank_an_empty_micro_batch():
    # Rows 2, 2, 1, 1 over dp 4 (uneven shares are fine, tests/test_uneven_batch.py), but in
    # micro-batches of 1 every rank runs 2 and the last two have only one row.
    with pytest.raises(ConfigError, match="train.micro_batch=1 needs 2 micro-batches per rank .* "
                                          "set train.micro_batch=2 or more"):
        validate(load_config("tiny", ["train.global_batch=6", "train.micro_batch=1"]), world_size=4)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.pp=4", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2", "train.micro_batch=4"], 4,
     "model.n_layers=4 is fewer than the 8 pipeline stages"),
    (["parallel.pp=2", "parallel.pp_layers=[2,1]", "train.micro_batch=4"], 2, "parallel.pp_layers"),
    (["parallel.pp=2", "parallel.pp_microbatches=3", "train.micro_batch=4"], 2, "parallel.pp_microbatches=3 !="),
])
def test_impossible_pipelines_are_config_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(load_config("tiny", overrides), world_size=world)


def test_zero3_with_compile_is_rejected_clearly():
    with pytest.raises(ConfigError, match="train.compile=true with parallel.zero=3 is not yet supported"):
        validate(load_config("tiny", ["parallel.zero=3", "train.compile=true"]), world_size=2)


def test_bad_sources():
    with pytest.raises(ConfigError, match="neither a TOML file nor a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("tiny", ["train.steps"])
