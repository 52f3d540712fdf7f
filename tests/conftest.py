import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned test workers import helpers from here


@pytest.fixture(scope="session", autouse=True)
def plait_cache(tmp_path_factory):
    """Keep data caches of the whole session in one temporary place, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("plait-cache")
    os.environ["PLAIT_CACHE"] = str(cache)
    yield cache
