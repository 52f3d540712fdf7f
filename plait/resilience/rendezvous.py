"""The store a restarted worker group initialises its process group with: it lives with the
rest of process setup in plait.train.runtime and is re-exported here under its old name."""

from plait.train.runtime import generation_store

__all__ = ["generation_store"]
