"""`plait plan` through plait.plan.cli.main: the JSON contract, ranking, explain, errors."""

import json

import pytest

from plait.errors import ConfigError
from plait.plan import cli
from plait.plan.models import PRESETS

LAYOUT_KEYS = {"tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "schedule", "virtual_stages",
               "recompute", "sequence_parallel"}


def run_json(capsys, argv):
    assert cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_layout_json_has_the_contract_fields(capsys):
    out = run_json(capsys, ["--model", "gpt3-175b", "--gpus", "16384", "--cluster", "h100-sxm",
                            "--global-batch", "2048", "--layout",
                            "tp=8,pp=16,dp=128,cp=1,ep=1,zero=1,micro_batch=1,schedule=interleaved,"
                            "virtual_stages=2,recompute=selective,sequence_parallel=true"])
    assert set(out["layout"]) == LAYOUT_KEYS
    assert out["layout"]["schedule"] == "interleaved" and out["layout"]["sequence_parallel"] is True
    assert out["fits"] is True and out["why"] is None
    assert set(out["memory_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}
    memory = out["memory_bytes"]
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
    assert out["tokens_per_s_per_gpu"] * out["step_time_s"] * 16384 == pytest.approx(2048 * 2048)
    # MFU counts model FLOPs (6N + 12 L d s) only; TFLOP/s also counts recomputation
    model = PRESETS["gpt3-175b"]
    assert out["mfu"] == pytest.approx(model.model_flops_per_token() * out["tokens_per_s_per_gpu"] / 989.5e12)
    assert out["tflops_per_gpu"] * 1e12 > out["mfu"] * 989.5e12
    assert 0.2 < out["mfu"] < 0.8


def test_left_out_keys_take_defaults_with_exact_and_dp_fills_the_gpus(capsys):
    out = run_json(capsys, ["--model", "llama3-8b", "--gpus", "64", "--layout", "tp=8", "--exact"])
    assert out["layout"]["dp"] == 8 and out["layout"]["zero"] == 0 and out["layout"]["pp"] == 1
    assert out["searched"] == [] and out["runner_up"] is None


def test_left_out_keys_are_searched_and_the_pins_kept(capsys):
    out = run_json(capsys, ["--model", "llama3-8b", "--gpus", "64", "--layout", "tp=8"])
    assert out["layout"]["tp"] == 8 and out["fits"] is True
    tp, pp, dp, cp = (out["layout"][k] for k in ("tp", "pp", "dp", "cp"))
    assert tp * pp * dp * cp == 64
    assert "zero" in out["searched"] and "tp" not in out["searched"]
    assert out["runner_up"]["layout"]["tp"] == 8
    assert out["runner_up"]["step_time_s"] >= out["step_time_s"] and out["runner_up_lost"]


def test_infeasible_layout_says_why(capsys):
    out = run_json(capsys, ["--model", "llama3-405b", "--gpus", "8", "--cluster", "a100-40gb",
                            "--global-batch", "8", "--layout", "tp=8"])
    assert out["fits"] is False and "GB" in out["why"]
    out = run_json(capsys, ["--model", "llama3-8b", "--gpus", "24", "--layout", "tp=3,dp=8"])
    assert out["fits"] is False and "tp=3" in out["why"]


def test_ranking_lists_top_k_fitting_layouts_fastest_first(capsys):
    out = run_json(capsys, ["--model", "llama3-70b", "--gpus", "256", "--cluster", "h100-sxm", "--top", "4"])
    assert len(out) == 4
    assert all(e["fits"] for e in out)
    times = [e["step_time_s"] for e in out]
    assert times == sorted(times)
    assert all(e["memory_bytes"]["total"] <= 80e9 for e in out)


def test_plait_preset_and_overrides(capsys):
    out = run_json(capsys, ["--model", "tiny", "--gpus", "2", "--set", "model.n_layers=8", "--layout", "dp=2"])
    assert out["fits"] is True
    small = run_json(capsys, ["--model", "tiny", "--gpus", "2", "--layout", "dp=2"])
    assert out["memory_bytes"]["params"] > small["memory_bytes"]["params"]
    dims = run_json(capsys, ["--gpus", "8", "--set", "model.dim=1024", "--set", "model.n_heads=8",
                             "--set", "model.n_kv_heads=8", "--set", "model.ffn_dim=4096",
                             "--set", "model.vocab_size=32000", "--set", "model.seq_len=1024", "--top", "2"])
    assert len(dims) == 2


def test_table_and_explain_print(capsys):
    assert cli.main(["--model", "llama3-8b", "--gpus", "16", "--top", "3"]) == 0
    assert "layouts fit" in capsys.readouterr().out
    assert cli.main(["--model", "llama3-8b", "--gpus", "16", "--explain", "tp=2,pp=2,micro_batch=1"]) == 0
    text = capsys.readouterr().out
    assert "step time" in text and "hardware_flops_per_token" in text
    assert "runner-up" in text and "searched" in text and "activation_bytes_per_layer" in text
    assert cli.main(["--model", "llama3-8b", "--gpus", "16", "--layout", "tp=2,pp=2", "--explain"]) == 0
    assert "layers_in_flight" in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [
    (["--model", "no-such-model", "--gpus", "8"], "no-such-model"),
    (["--model", "llama3-8b"], "--gpus"),
    (["--model", "llama3-8b", "--gpus", "8", "--set", "model.dimm=3"], "model.dimm"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "tp=two"], "tp"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "tp=4,dp=4"], "--gpus"),
    (["--model", "llama3-8b", "--gpus", "8", "--bogus"], "bogus"),
    (["--model", "llama3-8b", "--gpus", "8", "--set", "model.n_heads=7"], "n_heads"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "micro_batch=0"], "micro_batch"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "schedule=fast"], "schedule"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "recompute=some"], "recompute"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "tp=2,tp=4"], "tp"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "pp=3"], "pp=3"),
    (["--model", "llama3-8b", "--gpus", "8", "--layout", "tp=2", "--explain", "tp=2"], "--explain"),
])
def test_bad_input_raises_config_error_naming_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cli.main(argv)
