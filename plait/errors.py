"""User-facing errors: each carries one line that names the bad field and why.

The CLI turns any PlaitError into exit status 2 and that single line on stderr, so
raise these (never bare exceptions) for problems in config, data or checkpoints.
"""


class PlaitError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


class ConfigError(PlaitError):
    """An unknown key, a value of the wrong type, or an impossible combination."""


class DataError(PlaitError):
    """A missing, empty, unreadable or too-small corpus or token file."""


class CheckpointError(PlaitError):
    """A checkpoint that is missing, corrupt, or does not fit the run."""


class CollectiveOSError(OSError):
    """An OSError that every rank of a collective operation raises alike (a checkpoint write the
    machine refused on one of them): reported once, by rank 0, with the path concerned."""
