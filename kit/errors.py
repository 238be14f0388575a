"""User-facing errors.

Raise `KitError` (or a subclass) for anything the user can fix: a bad file, a bad row, a bad option.
The CLI prints its message on one line and exits with status 2; it never shows a traceback for it.
"""


class KitError(Exception):
    """An error caused by the user's input; the message names the file, row or field."""


class DataError(KitError):
    """Bad or missing input data (images, CSV rows, masks)."""


class ConfigError(KitError):
    """A bad configuration value or command-line option."""
