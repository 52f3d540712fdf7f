"""The prediction side of "against our own runs": predict_run_metrics on hand-computed numbers,
and --calibrate on a synthetic run directory."""

import json

import pytest

from plait.config import load_config, to_toml
from plait.errors import ConfigError
from plait.plan import cli
from plait.plan.calibrate import calibrate, load_run
from plait.plan.cluster import PRESETS
from plait.plan.estimate import predict_run_metrics

# tiny preset: dim 128, 4 layers, 4 heads (head_dim 32), 2 kv heads, ffn 384, vocab 256, tied.
# per layer: 128*128 (q) + 2*128*64 (k, v) + 128*128 (o) + 3*128*384 (mlp) + 2*128 (norms) = 196864
# total: 256*128 (embedding) + 4*196864 + 128 (final norm) = 820352
TINY_PARAMS = 820352


def test_tiny_param_count_and_state_bytes():
    metrics = predict_run_metrics(load_config("tiny"), 2)
    assert metrics["n_params"] == TINY_PARAMS
    assert metrics["state_bytes"] == TINY_PARAMS * 16  # fp32 AdamW: 4 + 4 + 8


@pytest.mark.parametrize("world,expected", [(1, 0.0), (2, 3281408.0), (4, 4922112.0)])
def test_comm_bytes_is_one_ring_all_reduce_of_fp32_grads(world, expected):
    # 2 (n-1)/n * 4 bytes * 820352: world 2 -> 3281408, world 4 -> 1.5 * 3281408
    assert predict_run_metrics(load_config("tiny"), world)["comm_bytes"] == expected


def test_untied_head_is_counted():
    cfg = load_config("tiny", ["model.tie_embeddings=false"])
    assert predict_run_metrics(cfg, 1)["n_params"] == TINY_PARAMS + 256 * 128


def test_activation_bytes_follow_korthikanti_bookkeeping():
    cfg = load_config("tiny")  # micro_batch 8, seq 128, fp32
    tokens = 8 * 128
    # per layer, 4-byte elements: 4 hidden tensors (norm and matmul inputs), 2 more because
    # plait's RMSNorm is not fused (each keeps its normalised output) + Q, K, V, O
    # (128 + 64 + 64 + 128 = 3 hidden) + 4 SwiGLU tensors of ffn 384
    per_layer = 4 * tokens * (6 * 128 + 384 + 4 * 384)
    head = 2 * 4 * tokens * 128 + 4 * tokens * 256
    assert predict_run_metrics(cfg, 2)["activation_bytes"] == 4 * per_layer + head


def _write_run(path, cfg, step_time, comm_bytes, steps=6):
    path.mkdir()
    (path / "config.toml").write_text(to_toml(cfg))
    rows = [{"step": i, "loss": 5.0, "step_time_s": step_time * (3 if i == 1 else 1), "tokens_per_s": 1.0,
             "mfu": None, "state_bytes": TINY_PARAMS * 16, "comm_bytes": comm_bytes,
             "peak_mem_bytes": 1} for i in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')


def test_calibrate_reads_a_run_and_fits_its_step_time(tmp_path):
    cfg = load_config("tiny", ["parallel.dp=2", "parallel.backend=gloo"])
    _write_run(tmp_path / "run", cfg, step_time=0.05, comm_bytes=3281408)
    run = load_run(tmp_path / "run")
    assert run.layout.dp == 2 and run.layout.micro_batch == 8
    assert run.measured["step_time_s"] == 0.05  # warm-up step skipped, torn line ignored
    report = calibrate([str(tmp_path / "run")], PRESETS["h100-sxm"])
    errors = report["runs"][0]["relative_error"]
    assert abs(errors["step_time_s"]) < 0.05
    assert errors["state_bytes"] == 0.0 and errors["comm_bytes"] == 0.0
    # a CPU run is far slower than an H100: the fitted compute fraction must say so
    assert report["fitted"]["compute_scale"] < 0.1


def test_calibrate_two_runs_separates_compute_from_network(tmp_path):
    one = load_config("tiny", ["parallel.dp=1", "train.micro_batch=8", "train.global_batch=8"])
    two = load_config("tiny", ["parallel.dp=2", "train.micro_batch=8", "train.global_batch=16"])
    _write_run(tmp_path / "a", one, step_time=0.04, comm_bytes=0)
    _write_run(tmp_path / "b", two, step_time=0.06, comm_bytes=3281408)
    report = calibrate([str(tmp_path / "a"), str(tmp_path / "b")], PRESETS["h100-sxm"])
    for run in report["runs"]:
        assert abs(run["relative_error"]["step_time_s"]) < 0.1, run


def test_calibrate_cli_and_missing_run(tmp_path, capsys):
    cfg = load_config("tiny", ["parallel.dp=2"])
    _write_run(tmp_path / "run", cfg, step_time=0.05, comm_bytes=3281408)
    assert cli.main(["--calibrate", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"][0]["predicted"]) == {"step_time_s", "state_bytes", "comm_bytes"}
    with pytest.raises(ConfigError, match="config.toml"):
        cli.main(["--calibrate", str(tmp_path / "nothing")])
