import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (plait.kernels) run under Triton's interpreter. Triton
# reads TRITON_INTERPRET when a kernel is decorated, i.e. when plait.kernels.rmsnorm & co
# are first imported, so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # spawned test workers import helpers from here


@pytest.fixture(scope="session", autouse=True)
def plait_cache(tmp_path_factory):
    """Keep data caches of the whole session in one temporary place, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("plait-cache")
    os.environ["PLAIT_CACHE"] = str(cache)
    yield cache
