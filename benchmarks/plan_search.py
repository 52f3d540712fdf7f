"""How long `plait plan` takes to rank every layout of Llama 3 405B on 16,384 H100s (one core).

Prints one JSON object. Target (issue 6): under 10 seconds.
"""

from __future__ import annotations

import json
import time

from plait.plan.cluster import PRESETS as CLUSTERS
from plait.plan.models import PRESETS as MODELS
from plait.plan.search import rank_layouts


def main() -> None:
    model, cluster, gpus, batch = MODELS["llama3-405b"], CLUSTERS["h100-sxm"], 16384, 2048  # 16M tokens
    start = time.perf_counter()
    top, considered, fitting = rank_layouts(model, cluster, gpus, batch, top=3)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "plan_search", "model": model.name, "gpus": gpus, "cluster": cluster.name,
        "global_batch": batch, "layouts_considered": considered, "layouts_fitting": fitting,
        "seconds": round(seconds, 3), "target_seconds": 10,
        "best": [{"layout": e.layout.short(), "step_time_s": round(e.step_time_s, 3), "mfu": round(e.mfu, 4),
                  "memory_gb": round(e.memory_bytes["total"] / 1e9, 1)} for e in top],
    }, indent=2))


if __name__ == "__main__":
    main()
