"""What each worker process of `plait train` runs: the training loop with resilience plugged in.

Under plait's launcher in elastic mode a worker takes part in the elastic job (elastic.py);
otherwise (restart mode or none, under plait's launcher, under torchrun, or alone) it is one
rank of the job, trained with the Resilience hooks (session.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from plait.config import Config
from plait.resilience.elastic import ID_ENV, elastic_train
from plait.resilience.session import Resilience
from plait.train.trainer import train


def train_with_resilience(cfg: Config, run_dir: Path) -> None:
    """This process's part of the job, until the run finishes (or fails)."""
    if ID_ENV in os.environ:  # a worker of plait's elastic launcher (resilience.mode=elastic)
        elastic_train(cfg, run_dir)
        return
    train(cfg, run_dir, hooks=[Resilience(cfg, run_dir)])
