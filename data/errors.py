"""The error type for mistakes in a job's input or configuration.

`python -m trainer.main` reports an `InputError` as one line naming the bad thing and
exits with status 2, without a traceback: it is the user's to fix, not a bug.
"""


class InputError(ValueError):
    """Bad configuration or data: a config key, file, folder, shape or dtype."""
