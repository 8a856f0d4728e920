"""User-facing errors: each carries one line that names the file or field and what to do.

Launch scripts catch ``UserError``, print its message as one line and exit with status 1.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug."""


class DataError(UserError):
    """Bad or missing corpus, tokenizer or token shards."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the run."""
