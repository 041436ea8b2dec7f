"""User-facing errors.  A CLI catches `UserError`, prints its one-line message and exits non-zero."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line; never shown as a traceback."""

    exit_code = 2


class ModelError(UserError):
    """An unknown, unloadable or incompatible model, layer or hook."""


class SourceError(UserError):
    """A text source that cannot be read or yields nothing usable."""


class StoreError(UserError):
    """A missing, incomplete, corrupt or incompatible activation store."""
