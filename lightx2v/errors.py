"""User-facing errors.

Everything a user can get wrong (a path, a key, a value) raises :class:`UserError` with a message that names
the value and what is allowed. The CLI prints such errors as one line and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user: missing files, unknown keys, values out of range."""


class CheckpointError(UserError):
    """A checkpoint on disk is missing files or has missing/unexpected/mis-shaped tensors."""


class Cancelled(Exception):
    """A request was cancelled (its cancel token was set); raised at the next step or stage boundary."""
