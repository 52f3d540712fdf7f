"""Compatibility re-export: GaLore moved to `plait.parallel.galore`.

GaLore is an optimizer that `plait.parallel.optimizer` builds, and `plait.lowcomm` sits
above `plait.parallel`, so the implementation lives in the lower package. This name keeps
older imports working; new code imports from `plait.parallel.galore`.
"""

from plait.parallel.galore import BASES, GaLore, GaLoreAdamW, galore_param_groups, optimizer_state_bytes

__all__ = ["BASES", "GaLore", "GaLoreAdamW", "galore_param_groups", "optimizer_state_bytes"]
