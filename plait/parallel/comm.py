"""Compatibility re-export: the collectives layer moved to `plait.comm`.

`plait.mesh` needs `Group`, and `plait.parallel` sits above `plait.mesh`, so the comm
module lives below both as `plait/comm.py`. This name keeps older imports working; new
code imports from `plait.comm`.
"""

from plait.comm import (
    BOOKKEEPING,
    CHECKPOINT,
    UNMETERED,
    CollectiveRecord,
    Comm,
    Group,
    Handle,
)

__all__ = ["BOOKKEEPING", "CHECKPOINT", "UNMETERED", "CollectiveRecord", "Comm", "Group", "Handle"]
