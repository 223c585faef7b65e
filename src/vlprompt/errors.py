"""User-facing errors.

Anything raised as a :class:`VlpromptError` is a problem with the user's input (a missing folder, a bad config
value, an unreadable checkpoint). The CLI prints its message as one line and exits with status 2 instead of
showing a traceback; library users can catch it like any other exception.
"""


class VlpromptError(Exception):
    """A problem with user input; the message says what is wrong and how to fix it."""


class ConfigError(VlpromptError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class DataError(VlpromptError, FileNotFoundError):
    """A dataset folder, split file or image is missing or corrupt."""


class CheckpointError(VlpromptError):
    """A weights or checkpoint file is missing, unsafe or incompatible."""


class NonFiniteTrainingError(VlpromptError):
    """Training produced a NaN or infinite loss, gradient or parameter that no loss scaler accounts for; the
    run stopped and its last finite checkpoint is kept."""


class StorageError(VlpromptError):
    """A file could not be written (the disk or quota is full); what was written before is intact."""


class RunInUseError(VlpromptError):
    """Another process holds the run folder's lock (it is training or evaluating that run)."""
