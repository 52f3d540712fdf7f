"""benchmarks/gpu_step.py runs once, on a GPU, with no chance to debug it there: its CPU
smoke mode keeps it working, and its own correctness checks (the chunked loss and the fused
kernels against their references) must pass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_step_smoke_runs_and_its_checks_pass():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--smoke", "--variants", "plait-full-logits",
         "plait-2x-micro-batch"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    checks = [r["ce_check"] for r in rows if "ce_check" in r]
    assert len(checks) == 2
    for check in checks:
        assert check["loss_rel_diff"] < 1e-6 and check["grad_hidden_rel_diff"] < 1e-5
        assert check["grad_weight_rel_diff"] < 1e-5
    kernel_checks = [r["kernel_check"] for r in rows if "kernel_check" in r]
    assert len(kernel_checks) == 2
    if os.environ.get("TRITON_INTERPRET") == "1":  # the tests' conftest turns the interpreter on
        for check in kernel_checks:
            assert set(check) == {"rms_norm", "swiglu", "rotary"}
            for name, diffs in check.items():
                assert all(v < 1e-5 for k, v in diffs.items() if k.endswith("rel_diff")), (name, diffs)
    runs = [r for r in rows if "step_s" in r]
    assert {r["side"] for r in runs} == {"reference", "plait", "plait-full-logits", "plait-2x-micro-batch"}
    assert len(runs) == 8  # two shapes
    assert all(math.isfinite(r["last_loss"]) and r["tokens_per_s"] > 0 for r in runs)
    assert sum("speedup" in r for r in rows) == 6
