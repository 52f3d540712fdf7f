"""`plait plan`: analytic memory and speed model for parallel training layouts (pure arithmetic).

models (what is trained) -> cluster (where) -> layouts (how it is split) -> memory, compute,
comm_model (the cost laws) -> estimate (one layout) -> search (all of them) -> cli.
calibrate fits the efficiency parameters to plait's own runs. See docs/plan.md.
"""
