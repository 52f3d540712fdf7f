"""`plait plan --calibrate points.json`: fit the device's compute efficiency to measured
(shape, tokens/s) points, and use the fit through the cluster file's [efficiency] table."""

import json

import pytest

from plait.errors import ConfigError
from plait.plan import cli
from plait.plan.cluster import PRESETS, load_cluster
from plait.plan.compute import efficiency_for

H200_POINTS = [{"model": "llama-1b", "micro_batch": 8, "tokens_per_s": 57400},
               {"model": "llama-1b", "micro_batch": 16, "tokens_per_s": 60400},
               {"model": "gpt2-124m", "micro_batch": 32, "tokens_per_s": 464500}]


def test_fit_to_points_and_use_it_through_a_cluster_file(tmp_path, capsys):
    points = tmp_path / "h200.json"
    # a slower device than the preset: every point at 70% of the measured H200 speed
    points.write_text(json.dumps({"points": [{**p, "tokens_per_s": 0.7 * p["tokens_per_s"]} for p in H200_POINTS]}))
    assert cli.main(["--calibrate", str(points), "--cluster", "h200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for row in report["points"]:
        assert abs(row["error_after"]) < 0.05 and row["error_before"] > 0.2
    assert report["fitted"]["gemm_ceiling"] < efficiency_for(PRESETS["h200"]).gemm_ceiling
    cluster_file = tmp_path / "mine.toml"
    cluster_file.write_text('gpus_per_node = 8\ndevice_memory_gb = 141\npeak_tflops = 989.5\nhbm_tbs = 4.8\n'
                            'intra_node_gbs = 450\ninter_node_gbit = 400\naccelerator = "h200"\n' + report["cluster_toml"])
    cluster = load_cluster(str(cluster_file))
    assert efficiency_for(cluster).gemm_ceiling == pytest.approx(report["fitted"]["gemm_ceiling"], rel=1e-3)
    out = json.loads(_run(capsys, ["--model", "llama-1b", "--gpus", "1", "--cluster", str(cluster_file),
                                   "--global-batch", "8", "--layout", "micro_batch=8", "--exact", "--json"]))
    assert out["tokens_per_s_per_gpu"] == pytest.approx(0.7 * 57400, rel=0.05)


def _run(capsys, argv):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("points,field", [
    ({"points": []}, "points"),
    ({"points": [{"model": "llama-1b", "micro_batch": 8}]}, "tokens_per_s"),
    ({"points": [{"model": "llama-1b", "micro_batch": 0, "tokens_per_s": 1}]}, "micro_batch"),
    ({"points": [{"model": "llama-1b", "micro_batch": 8, "tokens_per_s": 1, "speed": 2}]}, "speed"),
])
def test_bad_points_name_the_field(tmp_path, points, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(points))
    with pytest.raises(ConfigError, match=field):
        cli.main(["--calibrate", str(path), "--cluster", "h200"])


def test_unknown_efficiency_key_in_a_cluster_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('gpus_per_node = 8\ndevice_memory_gb = 80\npeak_tflops = 989.5\nintra_node_gbs = 450\n'
                    'inter_node_gbit = 400\n[efficiency]\nspeed = 2\n')
    with pytest.raises(ConfigError, match="efficiency.speed"):
        load_cluster(str(path))
